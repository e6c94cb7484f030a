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
import { type ChildProcess } from "node:child_process";
import type { Readable, Writable } from "node:stream";
/** Bytes per write_file / read_file request (the server caps one line at 32 MiB). */
export declare const CHUNK: number;
/** An error answer from Airlock: JSON-RPC `code` and `message`. */
export declare class AirlockError extends Error {
    readonly code: number;
    static readonly VM_FAILED = -32000;
    static readonly EXEC_FAILED = -32001;
    static readonly FILE_FAILED = -32002;
    static readonly INVALID_PARAMS = -32602;
    constructor(code: number, message: string);
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
type Json = any;
type Listener = (method: string, params: Json) => void;
declare class Conn {
    private out;
    private child?;
    private next;
    private pending;
    private listeners;
    private closed;
    constructor(input: Readable, out: Writable, child?: ChildProcess | undefined);
    private onLine;
    private fail;
    start(method: string, params: Json, listener?: Listener): {
        id: number;
        done: Promise<Json>;
    };
    call(method: string, params?: Json): Promise<Json>;
    close(): Promise<void>;
}
/** Output of a spawned command. */
export type Chunk = {
    stream: "stdout" | "stderr";
    data: Buffer;
};
/** A running command with stdin, signals, terminal size and streamed output. */
export declare class Process {
    private conn;
    private prefix;
    readonly id: number;
    private queue;
    private wake;
    private ended;
    /** Resolves to the exit code (128+N for signal N). */
    readonly exit: Promise<number>;
    /** @internal */
    constructor(conn: Conn, prefix: string, id: number, done: Promise<Json>);
    /** @internal */
    push(c: Chunk | null): void;
    /** Sends bytes to stdin. */
    write(data: Buffer | string): Promise<void>;
    /** End of file on stdin. */
    closeStdin(): Promise<void>;
    /** Sends a signal. */
    signal(signal: number): Promise<void>;
    /** Resizes the terminal. */
    resize(rows: number, cols: number): Promise<void>;
    /** Output chunks until the command ends. */
    output(): AsyncGenerator<Chunk>;
}
/** A sandbox. */
export declare class Sandbox {
    private conn;
    readonly id: string;
    private constructor();
    /** Boots a sandbox in a new `airlock rpc` process (stopped by `close`). */
    static create(o: CreateOptions): Promise<Sandbox>;
    /** Connects to a sandbox started with `airlock run -d` (closing leaves it running). */
    static attach(id: string, runtime?: string): Promise<Sandbox>;
    /** Runs a command and collects its output. */
    exec(cmd: Command, o?: ExecOptions): Promise<ExecResult>;
    /** Starts a command with stdin attached; `tty: [rows, cols]` gives it a terminal. */
    spawn(cmd: Command, o?: ExecOptions & {
        tty?: [number, number];
    }): Promise<Process>;
    /** Writes a file (parents created); large data goes in chunks. */
    writeFile(path: string, data: Buffer | string, mode?: number): Promise<void>;
    /** Reads a file, in chunks. */
    readFile(path: string): Promise<Buffer>;
    /** Lists a directory. */
    listFiles(path: string): Promise<FileInfo[]>;
    /** Forwards host `address:localPort` (0: any free port) to guest `remotePort`. */
    portForward(remotePort: number, localPort?: number, address?: string): Promise<Binding[]>;
    /** Adds network allow rules at run time. */
    allowHosts(...hosts: string[]): Promise<void>;
    /** Removes network allow rules. */
    removeHosts(...hosts: string[]): Promise<void>;
    /** Stops the sandbox (when created here) and closes the connection. */
    close(): Promise<void>;
}
export {};
