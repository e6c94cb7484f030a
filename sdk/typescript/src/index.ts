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

import { spawn, type ChildProcess } from "node:child_process";
import { createConnection } from "node:net";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { Readable, Writable } from "node:stream";

/** Bytes per write_file / read_file request (the server caps one line at 32 MiB). */
export const CHUNK = 4 * 1024 * 1024;

/** An error answer from Airlock: JSON-RPC `code` and `message`. */
export class AirlockError extends Error {
  static readonly VM_FAILED = -32000;
  static readonly EXEC_FAILED = -32001;
  static readonly FILE_FAILED = -32002;
  static readonly INVALID_PARAMS = -32602;
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(`[${code}] ${message}`);
  }
}

/** A finished command. */
export interface ExecResult {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
  durationMs: number;
}

/** A directory entry. */
export interface FileInfo {
  name: string;
  size: number;
  mode: number;
  isDir: boolean;
}

/** A bound port forward. */
export interface Binding {
  address: string;
  localPort: number;
  remotePort: number;
}

/** A secret: the guest sees a placeholder; the value goes only to `hosts`. */
export interface Secret {
  name: string;
  value: string;
  hosts: string[];
  placeholder?: string;
}

/** How to create a sandbox. */
export interface CreateOptions {
  image?: string;
  rootfs?: string;
  cpus?: number;
  memoryMb?: number;
  diskSizeMb?: number;
  env?: Record<string, string>;
  allowHosts?: string[];
  secrets?: Secret[];
  noNetwork?: boolean;
  hostname?: string;
  timeoutSeconds?: number;
  /** The airlock binary (default `$AIRLOCK_BIN` or `airlock`). */
  binary?: string;
}

/** A command: a string runs with `sh -c`. */
export type Command = string | string[];

/** Options of a command. */
export interface ExecOptions {
  cwd?: string;
  user?: string;
  env?: Record<string, string>;
  /** `exec` only: bytes for stdin. */
  stdin?: Buffer | string;
  /** `exec` only: cancel after this many milliseconds (rejects). */
  timeoutMs?: number;
}

type Json = any; // eslint-disable-line @typescript-eslint/no-explicit-any
type Listener = (method: string, params: Json) => void;

class Conn {
  private next = 1;
  private pending = new Map<number, { resolve: (v: Json) => void; reject: (e: Error) => void }>();
  private listeners = new Map<number, Listener>();
  private closed: Error | null = null;

  constructor(
    input: Readable,
    private out: Writable,
    private child?: ChildProcess,
  ) {
    const rl = createInterface({ input, crlfDelay: Infinity });
    rl.on("line", (line) => this.onLine(line));
    rl.on("close", () => this.fail(new AirlockError(AirlockError.VM_FAILED, "airlock connection closed")));
  }

  private onLine(line: string) {
    let msg: Json;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (typeof msg.method === "string") {
      this.listeners.get(msg.params?.id)?.(msg.method, msg.params ?? {});
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) return;
    this.pending.delete(msg.id);
    if (msg.error) p.reject(new AirlockError(msg.error.code, msg.error.message));
    else p.resolve(msg.result);
  }

  private fail(e: Error) {
    this.closed ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const l of this.listeners.values()) l("closed", {});
  }

  start(method: string, params: Json, listener?: Listener): { id: number; done: Promise<Json> } {
    const id = this.next++;
    const done = new Promise<Json>((resolve, reject) => {
      if (this.closed) return reject(this.closed);
      this.pending.set(id, { resolve, reject });
    });
    if (listener) this.listeners.set(id, listener);
    done.then(
      () => this.listeners.delete(id),
      () => this.listeners.delete(id),
    );
    this.out.write(JSON.stringify({ jsonrpc: "2.0", id, method, params }) + "\n");
    return { id, done };
  }

  call(method: string, params: Json = {}): Promise<Json> {
    return this.start(method, params).done;
  }

  async close(): Promise<void> {
    this.out.end();
    if (this.child && this.child.exitCode === null) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => this.child?.kill("SIGKILL"), 10_000);
        this.child!.once("exit", () => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }
}

function cmdParams(cmd: Command, o: ExecOptions = {}): Json {
  const p: Json = typeof cmd === "string" ? { command: cmd } : { argv: cmd };
  if (o.cwd) p.working_dir = o.cwd;
  if (o.user) p.user = o.user;
  if (o.env) p.env = o.env;
  return p;
}

const b64 = (b: Buffer | string) => Buffer.from(b).toString("base64");
const unb64 = (s: string | undefined) => Buffer.from(s ?? "", "base64");

/** Output of a spawned command. */
export type Chunk = { stream: "stdout" | "stderr"; data: Buffer };

/** A running command with stdin, signals, terminal size and streamed output. */
export class Process {
  private queue: Chunk[] = [];
  private wake: (() => void) | null = null;
  private ended = false;
  /** Resolves to the exit code (128+N for signal N). */
  readonly exit: Promise<number>;

  /** @internal */
  constructor(
    private conn: Conn,
    private prefix: string,
    readonly id: number,
    done: Promise<Json>,
  ) {
    this.exit = done.then((r) => Number(r.exit_code));
    const end = () => {
      this.ended = true;
      this.wake?.();
    };
    done.then(end, end);
  }

  /** @internal */
  push(c: Chunk | null) {
    if (c) this.queue.push(c);
    else this.ended = true;
    this.wake?.();
  }

  /** Sends bytes to stdin. */
  async write(data: Buffer | string): Promise<void> {
    const b = Buffer.from(data);
    for (let i = 0; i < Math.max(b.length, 1); i += CHUNK) {
      await this.conn.call(`${this.prefix}.stdin`, { id: this.id, data: b64(b.subarray(i, i + CHUNK)) });
    }
  }

  /** End of file on stdin. */
  closeStdin(): Promise<void> {
    return this.conn.call(`${this.prefix}.stdin_eof`, { id: this.id });
  }

  /** Sends a signal. */
  signal(signal: number): Promise<void> {
    return this.conn.call(`${this.prefix}.signal`, { id: this.id, signal });
  }

  /** Resizes the terminal. */
  resize(rows: number, cols: number): Promise<void> {
    return this.conn.call("exec_tty.resize", { id: this.id, rows, cols });
  }

  /** Output chunks until the command ends. */
  async *output(): AsyncGenerator<Chunk> {
    for (;;) {
      const c = this.queue.shift();
      if (c) {
        yield c;
        continue;
      }
      if (this.ended) return;
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
  }
}

function runtimeDir(): string {
  if (process.env.AIRLOCK_RUNTIME_DIR) return process.env.AIRLOCK_RUNTIME_DIR;
  if (process.env.XDG_RUNTIME_DIR) return join(process.env.XDG_RUNTIME_DIR, "airlock");
  return `/tmp/airlock-${process.getuid?.() ?? 0}`;
}

/** A sandbox. */
export class Sandbox {
  private constructor(
    private conn: Conn,
    readonly id: string,
  ) {}

  /** Boots a sandbox in a new `airlock rpc` process (stopped by `close`). */
  static async create(o: CreateOptions): Promise<Sandbox> {
    const bin = o.binary ?? process.env.AIRLOCK_BIN ?? "airlock";
    const child = spawn(bin, ["rpc"], { stdio: ["pipe", "pipe", "ignore"] });
    const conn = new Conn(child.stdout!, child.stdin!, child);
    const p: Json = { image: o.image ?? "" };
    if (o.rootfs) p.rootfs = o.rootfs;
    const res: Json = {};
    if (o.cpus) res.cpus = o.cpus;
    if (o.memoryMb) res.memory_mb = o.memoryMb;
    if (o.diskSizeMb) res.disk_size_mb = o.diskSizeMb;
    if (o.timeoutSeconds) res.timeout_seconds = o.timeoutSeconds;
    if (Object.keys(res).length) p.resources = res;
    if (o.env) p.env = o.env;
    if (o.hostname) p.hostname = o.hostname;
    if (o.noNetwork) p.network = { no_network: true };
    else if (o.allowHosts?.length || o.secrets?.length) {
      p.network = {
        allowed_hosts: o.allowHosts ?? [],
        secrets: Object.fromEntries(
          (o.secrets ?? []).map((s) => [s.name, { value: s.value, hosts: s.hosts, placeholder: s.placeholder }]),
        ),
      };
    }
    try {
      const r = await conn.call("create", p);
      return new Sandbox(conn, r.id);
    } catch (e) {
      await conn.close();
      throw e;
    }
  }

  /** Connects to a sandbox started with `airlock run -d` (closing leaves it running). */
  static async attach(id: string, runtime?: string): Promise<Sandbox> {
    const sock = createConnection(join(runtime ?? runtimeDir(), "sandboxes", id, "sock"));
    await new Promise<void>((resolve, reject) => {
      sock.once("connect", resolve);
      sock.once("error", reject);
    });
    const conn = new Conn(sock, sock);
    const info = await conn.call("info");
    return new Sandbox(conn, info.id);
  }

  /** Runs a command and collects its output. */
  async exec(cmd: Command, o: ExecOptions = {}): Promise<ExecResult> {
    const p = cmdParams(cmd, o);
    if (o.stdin !== undefined) p.stdin = b64(o.stdin);
    const { id, done } = this.conn.start("exec", p);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      if (o.timeoutMs === undefined) return;
      timer = setTimeout(() => {
        done.catch(() => {});
        this.conn.call("cancel", { id }).catch(() => {});
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
    } finally {
      clearTimeout(timer);
    }
  }

  /** Starts a command with stdin attached; `tty: [rows, cols]` gives it a terminal. */
  async spawn(cmd: Command, o: ExecOptions & { tty?: [number, number] } = {}): Promise<Process> {
    const p = cmdParams(cmd, o);
    let method = "exec_pipe";
    if (o.tty) {
      method = "exec_tty";
      [p.rows, p.cols] = o.tty;
    }
    let proc: Process | undefined;
    let ready!: () => void;
    const isReady = new Promise<void>((r) => (ready = r));
    const { id, done } = this.conn.start(method, p, (m, params) => {
      if (m.endsWith(".ready")) ready();
      else if (m.endsWith(".stdout")) proc?.push({ stream: "stdout", data: unb64(params.data) });
      else if (m.endsWith(".stderr")) proc?.push({ stream: "stderr", data: unb64(params.data) });
      else if (m === "closed") proc?.push(null);
    });
    proc = new Process(this.conn, method, id, done);
    await Promise.race([isReady, done]);
    return proc;
  }

  /** Writes a file (parents created); large data goes in chunks. */
  async writeFile(path: string, data: Buffer | string, mode = 0o644): Promise<void> {
    const b = Buffer.from(data);
    for (let i = 0; i < Math.max(b.length, 1); i += CHUNK) {
      await this.conn.call("write_file", { path, content: b64(b.subarray(i, i + CHUNK)), mode, append: i > 0 });
    }
  }

  /** Reads a file, in chunks. */
  async readFile(path: string): Promise<Buffer> {
    const parts: Buffer[] = [];
    let offset = 0;
    for (;;) {
      const r = await this.conn.call("read_file", { path, offset, length: CHUNK });
      const b = unb64(r.content);
      parts.push(b);
      offset += b.length;
      if (b.length < CHUNK) return Buffer.concat(parts);
    }
  }

  /** Lists a directory. */
  async listFiles(path: string): Promise<FileInfo[]> {
    const r = await this.conn.call("list_files", { path });
    return r.files.map((f: Json) => ({ name: f.name, size: f.size, mode: f.mode, isDir: f.is_dir }));
  }

  /** Forwards host `address:localPort` (0: any free port) to guest `remotePort`. */
  async portForward(remotePort: number, localPort = 0, address = "127.0.0.1"): Promise<Binding[]> {
    const r = await this.conn.call("port_forward", {
      forwards: [{ local_port: localPort, remote_port: remotePort }],
      addresses: [address],
    });
    return r.bindings.map((b: Json) => ({ address: b.address, localPort: b.local_port, remotePort: b.remote_port }));
  }

  /** Adds network allow rules at run time. */
  allowHosts(...hosts: string[]): Promise<void> {
    return this.conn.call("allow_list_add", { hosts });
  }

  /** Removes network allow rules. */
  removeHosts(...hosts: string[]): Promise<void> {
    return this.conn.call("allow_list_delete", { hosts });
  }

  /** Stops the sandbox (when created here) and closes the connection. */
  async close(): Promise<void> {
    await this.conn.call("close", { timeout_seconds: 5 }).catch(() => {});
    await this.conn.close();
  }
}
