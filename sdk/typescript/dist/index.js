/**
 * Airlock's TypeScript SDK (Node >= 20): run commands in microVM sandboxes.
 *
 * ```ts
 * import { Sandbox } from "airlock-sdk";
 * const sb = await Sandbox.create({ image: "alpine" });
 * console.log((await sb.exec(["uname", "-r"])).stdout.toString());
 * await sb.close();
 * ```
 *
 * It speaks Airlock's JSON-RPC API (matchlock-compatible) to `airlock rpc` (the sandbox lives
 * until `close`), or to the socket of a sandbox started with `airlock run -d`
 * (`Sandbox.attach(id)`).
 */
import { spawn } from "node:child_process";
import { createConnection } from "node:net";
import { join } from "node:path";
import { createInterface } from "node:readline";
/** Bytes per write_file / read_file request (the server caps one line at 32 MiB). */
export const CHUNK = 4 * 1024 * 1024;
/** An error answer from Airlock: JSON-RPC `code` and `message`. */
export class AirlockError extends Error {
    code;
    static VM_FAILED = -32000;
    static EXEC_FAILED = -32001;
    static FILE_FAILED = -32002;
    static INVALID_PARAMS = -32602;
    constructor(code, message) {
        super(`[${code}] ${message}`);
        this.code = code;
    }
}
class Conn {
    out;
    child;
    next = 1;
    pending = new Map();
    listeners = new Map();
    closed = null;
    constructor(input, out, child) {
        this.out = out;
        this.child = child;
        const rl = createInterface({ input, crlfDelay: Infinity });
        rl.on("line", (line) => this.onLine(line));
        rl.on("close", () => this.fail(new AirlockError(AirlockError.VM_FAILED, "airlock connection closed")));
    }
    onLine(line) {
        let msg;
        try {
            msg = JSON.parse(line);
        }
        catch {
            return;
        }
        if (typeof msg.method === "string") {
            this.listeners.get(msg.params?.id)?.(msg.method, msg.params ?? {});
            return;
        }
        const p = this.pending.get(msg.id);
        if (!p)
            return;
        this.pending.delete(msg.id);
        if (msg.error)
            p.reject(new AirlockError(msg.error.code, msg.error.message));
        else
            p.resolve(msg.result);
    }
    fail(e) {
        this.closed ??= e;
        for (const p of this.pending.values())
            p.reject(e);
        this.pending.clear();
        for (const l of this.listeners.values())
            l("closed", {});
    }
    start(method, params, listener) {
        const id = this.next++;
        const done = new Promise((resolve, reject) => {
            if (this.closed)
                return reject(this.closed);
            this.pending.set(id, { resolve, reject });
        });
        if (listener)
            this.listeners.set(id, listener);
        done.then(() => this.listeners.delete(id), () => this.listeners.delete(id));
        this.out.write(JSON.stringify({ jsonrpc: "2.0", id, method, params }) + "\n");
        return { id, done };
    }
    call(method, params = {}) {
        return this.start(method, params).done;
    }
    async close() {
        this.out.end();
        if (this.child && this.child.exitCode === null) {
            await new Promise((resolve) => {
                const t = setTimeout(() => this.child?.kill("SIGKILL"), 10_000);
                this.child.once("exit", () => {
                    clearTimeout(t);
                    resolve();
                });
            });
        }
    }
}
function cmdParams(cmd, o = {}) {
    const p = typeof cmd === "string" ? { command: cmd } : { argv: cmd };
    if (o.cwd)
        p.working_dir = o.cwd;
    if (o.user)
        p.user = o.user;
    if (o.env)
        p.env = o.env;
    return p;
}
const b64 = (b) => Buffer.from(b).toString("base64");
const unb64 = (s) => Buffer.from(s ?? "", "base64");
/** A running command with stdin, signals, terminal size and streamed output. */
export class Process {
    conn;
    prefix;
    id;
    queue = [];
    wake = null;
    ended = false;
    /** Resolves to the exit code (128+N for signal N). */
    exit;
    /** @internal */
    constructor(conn, prefix, id, done) {
        this.conn = conn;
        this.prefix = prefix;
        this.id = id;
        this.exit = done.then((r) => Number(r.exit_code));
        const end = () => {
            this.ended = true;
            this.wake?.();
        };
        done.then(end, end);
    }
    /** @internal */
    push(c) {
        if (c)
            this.queue.push(c);
        else
            this.ended = true;
        this.wake?.();
    }
    /** Sends bytes to stdin. */
    async write(data) {
        const b = Buffer.from(data);
        for (let i = 0; i < Math.max(b.length, 1); i += CHUNK) {
            await this.conn.call(`${this.prefix}.stdin`, { id: this.id, data: b64(b.subarray(i, i + CHUNK)) });
        }
    }
    /** End of file on stdin. */
    closeStdin() {
        return this.conn.call(`${this.prefix}.stdin_eof`, { id: this.id });
    }
    /** Sends a signal. */
    signal(signal) {
        return this.conn.call(`${this.prefix}.signal`, { id: this.id, signal });
    }
    /** Resizes the terminal. */
    resize(rows, cols) {
        return this.conn.call("exec_tty.resize", { id: this.id, rows, cols });
    }
    /** Output chunks until the command ends. */
    async *output() {
        for (;;) {
            const c = this.queue.shift();
            if (c) {
                yield c;
                continue;
            }
            if (this.ended)
                return;
            await new Promise((r) => (this.wake = r));
            this.wake = null;
        }
    }
}
function runtimeDir() {
    if (process.env.AIRLOCK_RUNTIME_DIR)
        return process.env.AIRLOCK_RUNTIME_DIR;
    if (process.env.XDG_RUNTIME_DIR)
        return join(process.env.XDG_RUNTIME_DIR, "airlock");
    return `/tmp/airlock-${process.getuid?.() ?? 0}`;
}
/** A sandbox. */
export class Sandbox {
    conn;
    id;
    constructor(conn, id) {
        this.conn = conn;
        this.id = id;
    }
    /** Boots a sandbox in a new `airlock rpc` process (stopped by `close`). */
    static async create(o) {
        const bin = o.binary ?? process.env.AIRLOCK_BIN ?? "airlock";
        const child = spawn(bin, ["rpc"], { stdio: ["pipe", "pipe", "ignore"] });
        const conn = new Conn(child.stdout, child.stdin, child);
        const p = { image: o.image ?? "" };
        if (o.rootfs)
            p.rootfs = o.rootfs;
        const res = {};
        if (o.cpus)
            res.cpus = o.cpus;
        if (o.memoryMb)
            res.memory_mb = o.memoryMb;
        if (o.diskSizeMb)
            res.disk_size_mb = o.diskSizeMb;
        if (o.timeoutSeconds)
            res.timeout_seconds = o.timeoutSeconds;
        if (Object.keys(res).length)
            p.resources = res;
        if (o.env)
            p.env = o.env;
        if (o.hostname)
            p.hostname = o.hostname;
        if (o.noNetwork)
            p.network = { no_network: true };
        else if (o.allowHosts?.length || o.secrets?.length) {
            p.network = {
                allowed_hosts: o.allowHosts ?? [],
                secrets: Object.fromEntries((o.secrets ?? []).map((s) => [s.name, { value: s.value, hosts: s.hosts, placeholder: s.placeholder }])),
            };
        }
        try {
            const r = await conn.call("create", p);
            return new Sandbox(conn, r.id);
        }
        catch (e) {
            await conn.close();
            throw e;
        }
    }
    /** Connects to a sandbox started with `airlock run -d` (closing leaves it running). */
    static async attach(id, runtime) {
        const sock = createConnection(join(runtime ?? runtimeDir(), "sandboxes", id, "sock"));
        await new Promise((resolve, reject) => {
            sock.once("connect", resolve);
            sock.once("error", reject);
        });
        const conn = new Conn(sock, sock);
        const info = await conn.call("info");
        return new Sandbox(conn, info.id);
    }
    /** Runs a command and collects its output. */
    async exec(cmd, o = {}) {
        const p = cmdParams(cmd, o);
        if (o.stdin !== undefined)
            p.stdin = b64(o.stdin);
        const { id, done } = this.conn.start("exec", p);
        let timer;
        const timeout = new Promise((_, reject) => {
            if (o.timeoutMs === undefined)
                return;
            timer = setTimeout(() => {
                done.catch(() => { });
                this.conn.call("cancel", { id }).catch(() => { });
                reject(new Error(`exec timed out after ${o.timeoutMs} ms`));
            }, o.timeoutMs);
        });
        try {
            const r = await Promise.race([done, timeout]);
            return {
                exitCode: Number(r.exit_code),
                stdout: unb64(r.stdout),
                stderr: unb64(r.stderr),
                durationMs: Number(r.duration_ms ?? 0),
            };
        }
        finally {
            clearTimeout(timer);
        }
    }
    /** Starts a command with stdin attached; `tty: [rows, cols]` gives it a terminal. */
    async spawn(cmd, o = {}) {
        const p = cmdParams(cmd, o);
        let method = "exec_pipe";
        if (o.tty) {
            method = "exec_tty";
            [p.rows, p.cols] = o.tty;
        }
        let proc;
        let ready;
        const isReady = new Promise((r) => (ready = r));
        const { id, done } = this.conn.start(method, p, (m, params) => {
            if (m.endsWith(".ready"))
                ready();
            else if (m.endsWith(".stdout"))
                proc?.push({ stream: "stdout", data: unb64(params.data) });
            else if (m.endsWith(".stderr"))
                proc?.push({ stream: "stderr", data: unb64(params.data) });
            else if (m === "closed")
                proc?.push(null);
        });
        proc = new Process(this.conn, method, id, done);
        await Promise.race([isReady, done]);
        return proc;
    }
    /** Writes a file (parents created); large data goes in chunks. */
    async writeFile(path, data, mode = 0o644) {
        const b = Buffer.from(data);
        for (let i = 0; i < Math.max(b.length, 1); i += CHUNK) {
            await this.conn.call("write_file", { path, content: b64(b.subarray(i, i + CHUNK)), mode, append: i > 0 });
        }
    }
    /** Reads a file, in chunks. */
    async readFile(path) {
        const parts = [];
        let offset = 0;
        for (;;) {
            const r = await this.conn.call("read_file", { path, offset, length: CHUNK });
            const b = unb64(r.content);
            parts.push(b);
            offset += b.length;
            if (b.length < CHUNK)
                return Buffer.concat(parts);
        }
    }
    /** Lists a directory. */
    async listFiles(path) {
        const r = await this.conn.call("list_files", { path });
        return r.files.map((f) => ({ name: f.name, size: f.size, mode: f.mode, isDir: f.is_dir }));
    }
    /** Forwards host `address:localPort` (0: any free port) to guest `remotePort`. */
    async portForward(remotePort, localPort = 0, address = "127.0.0.1") {
        const r = await this.conn.call("port_forward", {
            forwards: [{ local_port: localPort, remote_port: remotePort }],
            addresses: [address],
        });
        return r.bindings.map((b) => ({ address: b.address, localPort: b.local_port, remotePort: b.remote_port }));
    }
    /** Adds network allow rules at run time. */
    allowHosts(...hosts) {
        return this.conn.call("allow_list_add", { hosts });
    }
    /** Removes network allow rules. */
    removeHosts(...hosts) {
        return this.conn.call("allow_list_delete", { hosts });
    }
    /** Stops the sandbox (when created here) and closes the connection. */
    async close() {
        await this.conn.call("close", { timeout_seconds: 5 }).catch(() => { });
        await this.conn.close();
    }
}
