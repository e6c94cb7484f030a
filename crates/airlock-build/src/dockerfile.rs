//! Dockerfile parser: logical lines (continuations, comments, the `escape` directive),
//! instructions with their flags and forms, and the shell-like word expansion Docker applies
//! to `$VAR`, `${VAR}`, `${VAR:-default}` and `${VAR:+alt}`.
//!
//! Parsing never expands variables (their values depend on the stage and on build args);
//! the executor calls [`expand`] / [`expand_words`] when it runs a step.

use std::fmt;

/// A parse error at a line of the Dockerfile (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Line where the instruction starts (0: not tied to a line).
    pub line: usize,
    /// What is wrong and, where it helps, what to write instead.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "Dockerfile line {}: {}", self.line, self.message)
        } else {
            write!(f, "Dockerfile: {}", self.message)
        }
    }
}

impl std::error::Error for ParseError {}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG`s before the first `FROM` (usable in `FROM` lines only).
    pub global_args: Vec<ArgDecl>,
    /// Build stages, in order.
    pub stages: Vec<Stage>,
}

/// `ARG NAME[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// Variable name.
    pub name: String,
    /// Default value (unexpanded), if given.
    pub default: Option<String>,
}

/// One `FROM` and the instructions up to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The base: an image reference, `scratch` or an earlier stage's name (unexpanded).
    pub base: String,
    /// `AS name`, lowercased.
    pub name: Option<String>,
    /// `--platform=` if given (unexpanded).
    pub platform: Option<String>,
    /// Line of the `FROM`.
    pub line: usize,
    /// The `FROM` line as written (continuations joined).
    pub text: String,
    /// Instructions after `FROM`.
    pub steps: Vec<Step>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Line where it starts.
    pub line: usize,
    /// The instruction as written (continuations joined, keyword uppercased): progress output.
    pub text: String,
    /// What it does.
    pub instruction: Instruction,
}

/// Shell form (`RUN echo hi`) or exec form (`RUN ["echo", "hi"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run through the stage's shell (`/bin/sh -c` unless `SHELL` changed it).
    Shell(String),
    /// Run directly.
    Exec(Vec<String>),
}

/// `COPY`/`ADD` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Source paths or patterns (unexpanded).
    pub sources: Vec<String>,
    /// Destination (unexpanded).
    pub dest: String,
    /// `--from=stage|image`.
    pub from: Option<String>,
    /// `--chown=user[:group]`.
    pub chown: Option<String>,
    /// `--chmod=octal`.
    pub chmod: Option<String>,
}

/// The instructions `airlock build` understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `RUN`.
    Run(Command),
    /// `COPY`.
    Copy(CopySpec),
    /// `ADD` (local sources only).
    Add(CopySpec),
    /// `ENV` pairs (values unexpanded, quotes still in them).
    Env(Vec<(String, String)>),
    /// `ARG` declarations.
    Arg(Vec<ArgDecl>),
    /// `WORKDIR`.
    Workdir(String),
    /// `USER`.
    User(String),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `CMD`.
    Cmd(Command),
    /// `EXPOSE` ports (`80`, `53/udp`).
    Expose(Vec<String>),
    /// `LABEL` pairs (unexpanded).
    Label(Vec<(String, String)>),
    /// `VOLUME` paths.
    Volume(Vec<String>),
    /// `SHELL ["exe", "arg"]`.
    Shell(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// Accepted and ignored (`MAINTAINER`, `HEALTHCHECK`, `ONBUILD`): the reason is printed.
    Ignored(String),
}

/// A logical line: its first physical line number and joined text.
fn logical_lines(src: &str) -> Result<(char, Vec<(usize, String)>), ParseError> {
    let mut escape = '\\';
    let mut lines = src.lines().enumerate().peekable();
    // Parser directives: `# key=value` lines at the very top.
    while let Some((_, l)) = lines.peek() {
        let t = l.trim();
        let Some(rest) = t.strip_prefix('#') else {
            break;
        };
        let Some((k, v)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().to_ascii_lowercase();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric()) {
            break;
        }
        if k == "escape" {
            match v.trim() {
                "\\" => escape = '\\',
                "`" => escape = '`',
                other => {
                    return err(
                        lines.peek().map_or(1, |(n, _)| n + 1),
                        format!("escape directive must be \\ or `, not {other:?}"),
                    )
                }
            }
        }
        lines.next();
    }
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, l) in lines {
        let t = l.trim_start();
        // Comments and blank lines go, also inside a continued instruction.
        if t.starts_with('#') || (t.is_empty() && cur.is_none()) {
            continue;
        }
        if t.trim().is_empty() {
            continue;
        }
        let body = l.trim_end();
        let (text, continued) = match body.strip_suffix(escape) {
            Some(b) => (b, true),
            None => (body, false),
        };
        let entry = cur.get_or_insert_with(|| (i + 1, String::new()));
        if entry.1.is_empty() {
            entry.1.push_str(text.trim_start());
        } else {
            entry.1.push_str(text);
        }
        if !continued {
            out.extend(cur.take());
        }
    }
    // A trailing continuation ends the instruction at the end of the file.
    out.extend(cur.take());
    Ok((escape, out))
}

/// Splits `s` into words at unquoted whitespace, keeping quotes and escapes in the words
/// (so [`expand`] can still tell quoted text).
pub fn split_words(s: &str, escape: char) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) => {
                cur.push(c);
                if c == escape && q == '"' {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                in_word = true;
                cur.push(c);
                if c == escape {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                } else if c == '"' || c == '\'' {
                    quote = Some(c);
                }
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Expands one word as Docker does: quotes removed (no expansion inside single quotes),
/// escapes resolved, `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME:+word}` substituted from
/// `lookup` (unset names become empty).
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        if quote == Some('\'') {
            if c == '\'' {
                quote = None;
            } else {
                out.push(c);
            }
            i += 1;
            continue;
        }
        if c == escape {
            match chars.get(i + 1) {
                // Inside double quotes only a few characters are escapable, as in sh.
                Some(&n) if quote.is_none() || matches!(n, '"' | '$') || n == escape => {
                    out.push(n);
                    i += 2;
                }
                Some(_) => {
                    out.push(c);
                    i += 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
            continue;
        }
        match c {
            '\'' if quote.is_none() => quote = Some('\''),
            '"' if quote.is_none() => quote = Some('"'),
            '"' if quote == Some('"') => quote = None,
            '$' => {
                let (value, used) = variable(&chars[i + 1..], escape, lookup)?;
                out.push_str(&value);
                i += 1 + used;
                continue;
            }
            c => out.push(c),
        }
        i += 1;
    }
    if quote.is_some() {
        return Err(format!("unterminated quote in {word:?}"));
    }
    Ok(out)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The value of the variable reference after a `$`, and how many chars it used.
fn variable(
    rest: &[char],
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, usize), String> {
    match rest.first() {
        Some('{') => {
            let close = rest
                .iter()
                .position(|&c| c == '}')
                .ok_or("missing '}' in a ${...} variable")?;
            let inner: String = rest[1..close].iter().collect();
            let name_end = inner
                .find(|c: char| !is_name_char(c))
                .unwrap_or(inner.len());
            let (name, op) = inner.split_at(name_end);
            if name.is_empty() {
                return Err(format!("bad variable ${{{inner}}}: no name"));
            }
            let val = lookup(name);
            let v = if op.is_empty() {
                val.unwrap_or_default()
            } else if let Some(w) = op.strip_prefix(":-") {
                match val.filter(|v| !v.is_empty()) {
                    Some(v) => v,
                    None => expand(w, escape, lookup)?,
                }
            } else if let Some(w) = op.strip_prefix(":+") {
                match val.filter(|v| !v.is_empty()) {
                    Some(_) => expand(w, escape, lookup)?,
                    None => String::new(),
                }
            } else {
                return Err(format!(
                    "unsupported variable form ${{{inner}}}: use ${{NAME}}, ${{NAME:-default}} or ${{NAME:+alt}}"
                ));
            };
            Ok((v, close + 1))
        }
        Some(&c) if is_name_char(c) && !c.is_ascii_digit() => {
            let n = rest.iter().take_while(|&&c| is_name_char(c)).count();
            let name: String = rest[..n].iter().collect();
            Ok((lookup(&name).unwrap_or_default(), n))
        }
        // A lone `$` stays.
        _ => Ok(("$".into(), 0)),
    }
}

/// [`split_words`] then [`expand`] each word.
pub fn expand_words(
    s: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, String> {
    split_words(s, escape)?
        .iter()
        .map(|w| expand(w, escape, lookup))
        .collect()
}

/// A JSON array of strings (exec form), or `None` when `s` is not one (then it is shell form,
/// as in Docker).
fn json_array(s: &str) -> Option<Vec<String>> {
    let t = s.trim();
    if !t.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(t).ok()
}

fn command(rest: &str) -> Command {
    match json_array(rest) {
        Some(v) => Command::Exec(v),
        None => Command::Shell(rest.to_string()),
    }
}

/// Leading `--name=value` flags; returns them and the rest.
fn flags(rest: &str) -> (Vec<(String, String)>, &str) {
    let mut out = Vec::new();
    let mut r = rest.trim_start();
    while let Some(f) = r.strip_prefix("--") {
        let end = f.find(char::is_whitespace).unwrap_or(f.len());
        let (flag, tail) = f.split_at(end);
        let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
        out.push((k.to_ascii_lowercase(), v.to_string()));
        r = tail.trim_start();
    }
    (out, r)
}

fn check_name(line: usize, what: &str, name: &str) -> Result<(), ParseError> {
    if name.is_empty()
        || !name.chars().all(is_name_char)
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return err(
            line,
            format!("{what}: {name:?} is not a valid variable name (letters, digits, _)"),
        );
    }
    Ok(())
}

/// `K=V K2="v 2"` pairs, or the legacy `K value with spaces` form when `legacy` is allowed.
fn pairs(
    line: usize,
    what: &str,
    rest: &str,
    escape: char,
    legacy: bool,
) -> Result<Vec<(String, String)>, ParseError> {
    let words = split_words(rest, escape).map_err(|e| ParseError {
        line,
        message: format!("{what}: {e}"),
    })?;
    if words.is_empty() {
        return err(line, format!("{what} needs at least one KEY=VALUE"));
    }
    if !words[0].contains('=') {
        if !legacy {
            return err(
                line,
                format!("{what}: expected KEY=VALUE, got {:?}", words[0]),
            );
        }
        let key = words[0].clone();
        let value = rest.trim_start()[key.len()..].trim().to_string();
        if value.is_empty() {
            return err(line, format!("{what} {key}: give a value (KEY=VALUE)"));
        }
        return Ok(vec![(key, value)]);
    }
    let mut out = Vec::new();
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return err(line, format!("{what}: expected KEY=VALUE, got {w:?}"));
        };
        if k.is_empty() {
            return err(line, format!("{what}: {w:?} has no key"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn copy_spec(
    line: usize,
    what: &str,
    rest: &str,
    escape: char,
    allowed: &[&str],
) -> Result<CopySpec, ParseError> {
    let (fl, rest) = flags(rest);
    let mut spec = CopySpec {
        sources: Vec::new(),
        dest: String::new(),
        from: None,
        chown: None,
        chmod: None,
    };
    for (k, v) in fl {
        if !allowed.contains(&k.as_str()) {
            return err(
                line,
                format!(
                    "{what} --{k} is not supported (known: --{})",
                    allowed.join(", --")
                ),
            );
        }
        match k.as_str() {
            "from" => spec.from = Some(v.to_ascii_lowercase()),
            "chown" => spec.chown = Some(v),
            "chmod" => spec.chmod = Some(v),
            _ => {} // --link: layers are always independent here
        }
    }
    if let Some(c) = &spec.chmod {
        if u32::from_str_radix(c, 8).map_or(true, |m| m > 0o7777) {
            return err(
                line,
                format!("{what} --chmod={c}: give octal permissions, e.g. 0644"),
            );
        }
    }
    if rest.trim_start().starts_with("<<") {
        return err(line, format!("{what} with a heredoc is not supported"));
    }
    let words = match json_array(rest) {
        Some(v) => v,
        None => split_words(rest, escape).map_err(|e| ParseError {
            line,
            message: format!("{what}: {e}"),
        })?,
    };
    if words.len() < 2 {
        return err(
            line,
            format!("{what} needs a source and a destination: {what} SRC... DEST"),
        );
    }
    spec.dest = words[words.len() - 1].clone();
    spec.sources = words[..words.len() - 1].to_vec();
    Ok(spec)
}

fn instruction(
    line: usize,
    keyword: &str,
    rest: &str,
    escape: char,
) -> Result<Instruction, ParseError> {
    let need = |what: &str| -> Result<(), ParseError> {
        if rest.trim().is_empty() {
            err(line, format!("{what} needs an argument"))
        } else {
            Ok(())
        }
    };
    let words = |what: &str| -> Result<Vec<String>, ParseError> {
        need(what)?;
        split_words(rest, escape).map_err(|e| ParseError {
            line,
            message: format!("{what}: {e}"),
        })
    };
    Ok(match keyword {
        "RUN" => {
            need("RUN")?;
            let (fl, r) = flags(rest);
            if let Some((k, _)) = fl.first() {
                return err(line, format!("RUN --{k} is not supported by airlock build"));
            }
            if r.trim_start().starts_with("<<") {
                return err(
                    line,
                    "RUN with a heredoc is not supported: use a shell script file and COPY it",
                );
            }
            Instruction::Run(command(r))
        }
        "CMD" => {
            need("CMD")?;
            Instruction::Cmd(command(rest))
        }
        "ENTRYPOINT" => {
            need("ENTRYPOINT")?;
            Instruction::Entrypoint(command(rest))
        }
        "COPY" => Instruction::Copy(copy_spec(
            line,
            "COPY",
            rest,
            escape,
            &["from", "chown", "chmod", "link"],
        )?),
        "ADD" => Instruction::Add(copy_spec(
            line,
            "ADD",
            rest,
            escape,
            &["chown", "chmod", "link"],
        )?),
        "ENV" => {
            let p = pairs(line, "ENV", rest, escape, true)?;
            for (k, _) in &p {
                check_name(line, "ENV", k)?;
            }
            Instruction::Env(p)
        }
        "LABEL" => Instruction::Label(pairs(line, "LABEL", rest, escape, false)?),
        "ARG" => {
            let mut v = Vec::new();
            for w in words("ARG")? {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (w.clone(), None),
                };
                check_name(line, "ARG", &name)?;
                v.push(ArgDecl { name, default });
            }
            Instruction::Arg(v)
        }
        "WORKDIR" => {
            need("WORKDIR")?;
            Instruction::Workdir(rest.trim().to_string())
        }
        "USER" => {
            need("USER")?;
            Instruction::User(rest.trim().to_string())
        }
        "EXPOSE" => Instruction::Expose(words("EXPOSE")?),
        "VOLUME" => {
            need("VOLUME")?;
            Instruction::Volume(match json_array(rest) {
                Some(v) => v,
                None => words("VOLUME")?,
            })
        }
        "SHELL" => match json_array(rest) {
            Some(v) if !v.is_empty() => Instruction::Shell(v),
            _ => {
                return err(
                    line,
                    "SHELL takes the JSON form: SHELL [\"/bin/bash\", \"-c\"]",
                )
            }
        },
        "STOPSIGNAL" => {
            need("STOPSIGNAL")?;
            Instruction::StopSignal(rest.trim().to_string())
        }
        "MAINTAINER" => Instruction::Ignored("MAINTAINER is deprecated: use LABEL".into()),
        "HEALTHCHECK" => {
            Instruction::Ignored("HEALTHCHECK is not supported and is left out".into())
        }
        "ONBUILD" => Instruction::Ignored("ONBUILD is not supported and is left out".into()),
        "FROM" => unreachable!("FROM handled by the caller"),
        other => {
            return err(
                line,
                format!(
                "unknown instruction {other}: airlock build knows FROM, RUN, COPY, ADD, ENV, ARG, \
                     WORKDIR, USER, ENTRYPOINT, CMD, EXPOSE, LABEL, VOLUME, SHELL, STOPSIGNAL"
            ),
            )
        }
    })
}

/// Parses a Dockerfile.
pub fn parse(src: &str) -> Result<Dockerfile, ParseError> {
    let (escape, lines) = logical_lines(src)?;
    let mut df = Dockerfile {
        global_args: Vec::new(),
        stages: Vec::new(),
    };
    for (line, text) in lines {
        let (kw, rest) = match text.find(char::is_whitespace) {
            Some(i) => (&text[..i], text[i..].trim_start()),
            None => (text.as_str(), ""),
        };
        let keyword = kw.to_ascii_uppercase();
        let shown = if rest.is_empty() {
            keyword.clone()
        } else {
            format!("{keyword} {rest}")
        };
        if keyword == "FROM" {
            let (fl, r) = flags(rest);
            let mut platform = None;
            for (k, v) in fl {
                if k != "platform" {
                    return err(
                        line,
                        format!("FROM --{k} is not supported (known: --platform)"),
                    );
                }
                platform = Some(v);
            }
            let w = split_words(r, escape).map_err(|e| ParseError {
                line,
                message: format!("FROM: {e}"),
            })?;
            let (base, name) = match &w[..] {
                [b] => (b.clone(), None),
                [b, as_, n] if as_.eq_ignore_ascii_case("as") => {
                    let n = n.to_ascii_lowercase();
                    if !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                        || !n.starts_with(|c: char| c.is_ascii_alphabetic())
                    {
                        return err(line, format!("FROM ... AS {n}: stage names start with a letter and use letters, digits, - _ ."));
                    }
                    if df.stages.iter().any(|s| s.name.as_deref() == Some(&n)) {
                        return err(line, format!("stage name {n} is used twice"));
                    }
                    (b.clone(), Some(n))
                }
                _ => return err(line, "FROM takes IMAGE [AS NAME]"),
            };
            df.stages.push(Stage {
                base,
                name,
                platform,
                line,
                text: shown,
                steps: Vec::new(),
            });
            continue;
        }
        let instr = instruction(line, &keyword, rest, escape)?;
        match df.stages.last_mut() {
            Some(stage) => stage.steps.push(Step {
                line,
                text: shown,
                instruction: instr,
            }),
            None => match instr {
                Instruction::Arg(a) => df.global_args.extend(a),
                _ => {
                    return err(
                        line,
                        format!("{keyword} before the first FROM: only ARG may come before FROM"),
                    )
                }
            },
        }
    }
    if df.stages.is_empty() {
        return err(
            0,
            "no FROM instruction: a Dockerfile starts with FROM IMAGE (or FROM scratch)",
        );
    }
    Ok(df)
}

/// The escape character a Dockerfile declares (`\` unless an `# escape=` directive says).
pub fn escape_char(src: &str) -> char {
    logical_lines(src).map(|(e, _)| e).unwrap_or('\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            "SP" => Some("a b".into()),
            _ => None,
        }
    }

    fn ex(s: &str) -> String {
        expand(s, '\\', &vars).unwrap()
    }

    #[test]
    fn expansion_forms() {
        assert_eq!(ex("$A"), "alpha");
        assert_eq!(ex("${A}x"), "alphax");
        assert_eq!(ex("$Ax"), "");
        assert_eq!(ex("${NOPE:-def}"), "def");
        assert_eq!(ex("${EMPTY:-def}"), "def");
        assert_eq!(ex("${A:-def}"), "alpha");
        assert_eq!(ex("${A:+set}"), "set");
        assert_eq!(ex("${NOPE:+set}"), "");
        assert_eq!(ex("${NOPE:-$A}"), "alpha");
        assert_eq!(ex("'$A'"), "$A");
        assert_eq!(ex("\"$A b\""), "alpha b");
        assert_eq!(ex("\\$A"), "$A");
        assert_eq!(ex("a\\ b"), "a b");
        assert_eq!(ex("cost$"), "cost$");
        assert_eq!(ex("$1"), "$1");
        assert!(expand("${A", '\\', &vars).is_err());
        assert!(expand("${A/x/y}", '\\', &vars).is_err());
        assert!(expand("\"open", '\\', &vars).is_err());
        assert!(expand("${}", '\\', &vars).is_err());
    }

    #[test]
    fn words_keep_quotes_until_expanded() {
        let w = split_words(r#"a "b c" d\ e 'f g'"#, '\\').unwrap();
        assert_eq!(w, ["a", "\"b c\"", "d\\ e", "'f g'"]);
        let e = expand_words(r#"K="v 1" $SP"#, '\\', &vars).unwrap();
        assert_eq!(e, ["K=v 1", "a b"]);
        assert!(split_words("'x", '\\').is_err());
    }

    #[test]
    fn a_full_dockerfile() {
        let src = r#"# syntax=docker/dockerfile:1
# escape=\
ARG BASE=busybox
FROM ${BASE} AS build
# a comment
ARG V=1 W
ENV A=1 B="two words" \
    C=3
ENV LEGACY value with spaces
WORKDIR /app
COPY --chown=1000:1000 --chmod=0644 a.txt b.txt ./
COPY ["with space.txt", "/dest/"]
RUN echo one \
  # comment inside a continuation
  && echo two
RUN ["/bin/sh", "-c", "echo exec"]
run not json [
USER alice
EXPOSE 80 53/udp
LABEL a=b "c d"=e
VOLUME ["/data"]
VOLUME /v1 /v2
SHELL ["/bin/sh", "-ec"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/app"]
CMD --help

from scratch
COPY --from=build /app/out /out
CMD ["/out"]
"#;
        let df = parse(src).unwrap();
        assert_eq!(
            df.global_args,
            [ArgDecl {
                name: "BASE".into(),
                default: Some("busybox".into())
            }]
        );
        assert_eq!(df.stages.len(), 2);
        let s = &df.stages[0];
        assert_eq!(s.base, "${BASE}");
        assert_eq!(s.name.as_deref(), Some("build"));
        assert_eq!(s.line, 4);
        let i: Vec<&Instruction> = s.steps.iter().map(|s| &s.instruction).collect();
        assert_eq!(
            *i[0],
            Instruction::Arg(vec![
                ArgDecl {
                    name: "V".into(),
                    default: Some("1".into())
                },
                ArgDecl {
                    name: "W".into(),
                    default: None
                },
            ])
        );
        assert_eq!(
            *i[1],
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"two words\"".into()),
                ("C".into(), "3".into()),
            ])
        );
        assert_eq!(s.steps[1].line, 7);
        assert_eq!(
            *i[2],
            Instruction::Env(vec![("LEGACY".into(), "value with spaces".into())])
        );
        assert_eq!(*i[3], Instruction::Workdir("/app".into()));
        match i[4] {
            Instruction::Copy(c) => {
                assert_eq!(c.sources, ["a.txt", "b.txt"]);
                assert_eq!(c.dest, "./");
                assert_eq!(c.chown.as_deref(), Some("1000:1000"));
                assert_eq!(c.chmod.as_deref(), Some("0644"));
            }
            o => panic!("{o:?}"),
        }
        match i[5] {
            Instruction::Copy(c) => assert_eq!(c.sources, ["with space.txt"]),
            o => panic!("{o:?}"),
        }
        assert_eq!(
            *i[6],
            Instruction::Run(Command::Shell("echo one   && echo two".into()))
        );
        assert_eq!(s.steps[6].text, "RUN echo one   && echo two");
        assert_eq!(
            *i[7],
            Instruction::Run(Command::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo exec".into()
            ]))
        );
        assert_eq!(*i[8], Instruction::Run(Command::Shell("not json [".into())));
        assert_eq!(
            *i[10],
            Instruction::Expose(vec!["80".into(), "53/udp".into()])
        );
        assert_eq!(
            *i[11],
            Instruction::Label(vec![
                ("a".into(), "b".into()),
                ("\"c d\"".into(), "e".into())
            ])
        );
        assert_eq!(*i[12], Instruction::Volume(vec!["/data".into()]));
        assert_eq!(
            *i[13],
            Instruction::Volume(vec!["/v1".into(), "/v2".into()])
        );
        assert_eq!(
            *i[14],
            Instruction::Shell(vec!["/bin/sh".into(), "-ec".into()])
        );
        assert_eq!(
            *i[16],
            Instruction::Entrypoint(Command::Exec(vec!["/bin/app".into()]))
        );
        assert_eq!(*i[17], Instruction::Cmd(Command::Shell("--help".into())));
        let s2 = &df.stages[1];
        assert_eq!(s2.base, "scratch");
        match &s2.steps[0].instruction {
            Instruction::Copy(c) => assert_eq!(c.from.as_deref(), Some("build")),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn escape_directive_and_trailing_continuation() {
        let df = parse("# escape=`\nFROM x\nRUN echo a `\n  b\nRUN echo c `").unwrap();
        let st = &df.stages[0].steps;
        assert_eq!(
            st[0].instruction,
            Instruction::Run(Command::Shell("echo a   b".into()))
        );
        assert_eq!(
            st[1].instruction,
            Instruction::Run(Command::Shell("echo c ".into()))
        );
        assert_eq!(escape_char("# escape=`\nFROM x"), '`');
        // A directive after the first instruction is a plain comment.
        let df = parse("FROM x\n# escape=`\nRUN a \\\n b").unwrap();
        assert_eq!(
            df.stages[0].steps[0].instruction,
            Instruction::Run(Command::Shell("a  b".into()))
        );
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "no FROM"),
            ("# only a comment\n", 0, "no FROM"),
            ("RUN x\nFROM y", 1, "before the first FROM"),
            ("FROM x\nFROB y", 2, "unknown instruction FROB"),
            ("FROM x\nCOPY onlyone", 2, "source and a destination"),
            ("FROM x\nCOPY --bogus=1 a b", 2, "--bogus"),
            ("FROM x\nADD --from=y a b", 2, "--from"),
            ("FROM x\nCOPY --chmod=999 a b", 2, "octal"),
            ("FROM x\nRUN", 2, "needs an argument"),
            (
                "FROM x\nRUN --mount=type=cache,target=/x true",
                2,
                "--mount",
            ),
            ("FROM x\nRUN <<EOF\nEOF", 2, "heredoc"),
            ("FROM x\nENV", 2, "KEY=VALUE"),
            ("FROM x\nENV 1A=b", 2, "valid variable name"),
            ("FROM x\nENV K", 2, "give a value"),
            ("FROM x\nLABEL novalue", 2, "KEY=VALUE"),
            ("FROM x\nARG a-b", 2, "valid variable name"),
            ("FROM x\nSHELL /bin/sh", 2, "JSON form"),
            ("FROM x y", 1, "IMAGE [AS NAME]"),
            ("FROM x AS 1bad", 1, "stage names"),
            ("FROM x AS a\nFROM y AS A", 2, "used twice"),
            ("FROM --bad=1 x", 1, "--bad"),
            ("FROM x\nENV A=\"open", 2, "unterminated"),
            ("# escape=x\nFROM y", 1, "escape directive"),
        ];
        for (src, line, msg) in cases {
            let e = parse(src).expect_err(src);
            assert_eq!(e.line, *line, "{src:?}: {e}");
            assert!(e.message.contains(msg), "{src:?}: {e}");
        }
    }

    #[test]
    fn keywords_are_case_insensitive_and_ignored_ones_say_why() {
        let df = parse("from x\nmaintainer me\nHealthCheck CMD true\nonbuild RUN x").unwrap();
        for s in &df.stages[0].steps {
            assert!(matches!(s.instruction, Instruction::Ignored(_)), "{s:?}");
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        for src in [
            "FROM x\nRUN \\",
            "FROM\n",
            "FROM x\nCOPY [\"a\"",
            "FROM x\nENV ${",
            "\u{0}",
            "FROM x\nCOPY --=1 a b",
            "FROM x\nCMD [1,2]",
            "FROM x\nLABEL =v",
            "FROM x\n\\",
            "FROM x\nENV A \\\n",
            "FROM x AS",
            "# escape=\\\n# escape=`\nFROM x\nRUN a `",
        ] {
            let _ = parse(src);
        }
    }
}
