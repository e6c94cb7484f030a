//! User-supplied Dockerfiles and `.dockerignore` files (input: Dockerfile, NUL, dockerignore)
//! through `airlock build`'s parser, variable expansion and ignore matcher. Must never panic;
//! a parsed file has at least one stage, and context paths never climb out.
#![no_main]

use airlock_build::context::{clean_rel, Ignore};
use airlock_build::dockerfile::{self, Instruction};
use libfuzzer_sys::fuzz_target;

fn lookup(k: &str) -> Option<String> {
    (k.len() % 2 == 0).then(|| format!("v{k}"))
}

fuzz_target!(|data: &[u8]| {
    let (df, ig) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let df = String::from_utf8_lossy(df);
    let esc = dockerfile::escape_char(&df);
    if let Ok(parsed) = dockerfile::parse(&df) {
        assert!(!parsed.stages.is_empty());
        for s in &parsed.stages {
            let _ = dockerfile::expand(&s.base, esc, &lookup);
            for st in &s.steps {
                assert!(st.line >= s.line);
                match &st.instruction {
                    Instruction::Env(p) | Instruction::Label(p) => {
                        for (k, v) in p {
                            let _ = dockerfile::expand(k, esc, &lookup);
                            let _ = dockerfile::expand(v, esc, &lookup);
                        }
                    }
                    Instruction::Copy(c) | Instruction::Add(c) => {
                        for src in c.sources.iter().chain([&c.dest]) {
                            if let Ok(e) = dockerfile::expand(src, esc, &lookup) {
                                if let Some(r) = clean_rel(e.trim_start_matches('/')) {
                                    assert!(!r.split('/').any(|p| p == ".."), "{r}");
                                }
                            }
                        }
                    }
                    Instruction::Workdir(w) | Instruction::User(w) => {
                        let _ = dockerfile::expand_words(w, esc, &lookup);
                    }
                    _ => {}
                }
            }
        }
    }
    let ig = String::from_utf8_lossy(ig);
    if let Ok(rules) = Ignore::parse(&ig) {
        for line in ig.lines().take(16) {
            if let Some(p) = clean_rel(line.trim().trim_start_matches(['!', '/'])) {
                let _ = rules.excluded(&p);
            }
        }
        for p in ["a", "a/b/c", ".git/config", "node_modules/x/y.js", ""] {
            let _ = rules.excluded(p);
        }
    }
});
