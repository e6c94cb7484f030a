/* The exec benchmark's in-guest baseline: one small static program that spawns a command N
 * times, each a plain fork (or posix_spawn: vfork-style) + execve + waitpid, and prints
 * each spawn's wall time in nanoseconds, one per line.
 * Usage: spawnloop N fork|spawn PROGRAM [ARG...] */
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: spawnloop N fork|spawn PROGRAM [ARG...]\n");
        return 2;
    }
    int n = atoi(argv[1]);
    int use_fork = strcmp(argv[2], "fork") == 0;
    char **args = argv + 3;
    long long *t = calloc(n > 0 ? n : 1, sizeof *t);
    for (int i = 0; i < n; i++) {
        long long t0 = now_ns();
        pid_t pid;
        if (use_fork) {
            pid = fork();
            if (pid < 0) { perror("fork"); return 1; }
            if (pid == 0) {
                execve(args[0], args, environ);
                _exit(127);
            }
        } else if (posix_spawn(&pid, args[0], NULL, NULL, args, environ) != 0) {
            perror("posix_spawn");
            return 1;
        }
        int st;
        if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "spawnloop: child failed\n");
            return 1;
        }
        t[i] = now_ns() - t0;
    }
    for (int i = 0; i < n; i++) printf("%lld\n", t[i]);
    return 0;
}
