// Airlock's TypeScript SDK against real sandboxes. Needs AIRLOCK_BIN and AIRLOCK_TEST_IMAGE
// (crates/airlock/tests/sdk.rs sets both; run via `npm test`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { AirlockError, Sandbox } from "../dist/index.js";

const IMAGE = process.env.AIRLOCK_TEST_IMAGE ?? "demo/busybox:latest";
const BIN = process.env.AIRLOCK_BIN ?? "airlock";

async function rejectsWith(p, code, text) {
  await assert.rejects(p, (e) => e instanceof AirlockError && e.code === code && e.message.includes(text));
}

test("exec, streaming, stdin, tty, files, errors", async () => {
  const sb = await Sandbox.create({ image: IMAGE, env: { A: "1" }, allowHosts: ["example.com"] });
  try {
    const r = await sb.exec(["sh", "-c", "echo $A $B; echo e >&2; exit 5"], { env: { B: "2" } });
    assert.equal(r.exitCode, 5);
    assert.equal(r.stdout.toString(), "1 2\n");
    assert.equal(r.stderr.toString(), "e\n");
    assert.equal((await sb.exec("cat", { stdin: "in" })).stdout.toString(), "in");
    assert.equal((await sb.exec("id -u", { user: "nobody", cwd: "/tmp" })).stdout.toString(), "65534\n");
    await rejectsWith(sb.exec(["/no/such"]), AirlockError.EXEC_FAILED, "not found");

    const p = await sb.spawn(["sh", "-c", "while read l; do echo out:$l; echo err:$l >&2; done"]);
    await p.write("a\nb\n");
    await p.closeStdin();
    const seen = { stdout: "", stderr: "" };
    for await (const c of p.output()) seen[c.stream] += c.data.toString();
    assert.equal(await p.exit, 0);
    assert.deepEqual(seen, { stdout: "out:a\nout:b\n", stderr: "err:a\nerr:b\n" });

    const t = await sb.spawn("stty size; sleep 30", { tty: [31, 97] });
    let first = "";
    for await (const c of t.output()) {
      first += c.data.toString();
      if (first.includes("\n")) break;
    }
    assert.match(first, /31 97/);
    await t.signal(9);
    assert.equal(await t.exit, 128 + 9);

    const big = randomBytes(9 * 1024 * 1024);
    await sb.writeFile("/data/big.bin", big, 0o600);
    assert.ok((await sb.readFile("/data/big.bin")).equals(big));
    const files = await sb.listFiles("/data");
    assert.equal(files.length, 1);
    assert.equal(files[0].size, big.length);
    assert.equal(files[0].mode & 0o777, 0o600);
    await rejectsWith(sb.readFile("/missing"), AirlockError.FILE_FAILED, "/missing");

    await assert.rejects(sb.exec("sleep 30", { timeoutMs: 1000 }), /timed out/);
    assert.equal((await sb.exec("echo alive")).stdout.toString(), "alive\n");
    const many = await Promise.all([0, 1, 2, 3].map((i) => sb.exec(`echo ${i}`)));
    assert.deepEqual(many.map((m) => m.stdout.toString()), ["0\n", "1\n", "2\n", "3\n"]);

    // Port forwards reach a guest server; allow-list changes reach the policy.
    await sb.exec("mkdir -p /www && echo served > /www/i && httpd -p 8000 -h /www");
    const [b] = await sb.portForward(8000);
    const body = await (await fetch(`http://127.0.0.1:${b.localPort ?? b.local_port}/i`)).text();
    assert.equal(body, "served\n");
    await sb.allowHosts("a.example");
    await sb.removeHosts("a.example");
    await rejectsWith(sb.allowHosts("not a host"), AirlockError.INVALID_PARAMS, "not a host");
  } finally {
    await sb.close();
  }
});

test("attach to a run -d sandbox", async () => {
  const rootfs = process.env.AIRLOCK_TEST_ROOTFS;
  const args = ["run", "-d", ...(rootfs ? ["--rootfs", rootfs] : ["--image", IMAGE])];
  const id = execFileSync(BIN, args).toString().trim();
  try {
    const sb = await Sandbox.attach(id);
    assert.equal(sb.id, id);
    await sb.writeFile("/root/note", "kept");
    await sb.close();
    assert.equal(execFileSync(BIN, ["exec", id, "--", "cat", "/root/note"]).toString(), "kept");
  } finally {
    execFileSync(BIN, ["rm", "-f", id]);
  }
});
