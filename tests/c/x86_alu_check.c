/*
 * x86_alu_check: the run-ahead emulator of the shim (x86_alu.h) against the
 * CPU.  For random instructions of every form x86_decode_op() accepts, with
 * random registers and arithmetic flags, it runs the instruction on the CPU
 * (copied into a trampoline) and through x86_exec(), and compares all
 * sixteen registers and the six arithmetic flags; for every condition code,
 * x86_cond() against the CPU's SETcc.  It also checks that forms the
 * emulator must refuse (memory operands, %rsp, calls) are refused.
 *
 *   x86_alu_check N SEED     N random cases; prints "cases=N ... mismatches=0"
 *                            and exits 1 on any mismatch
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "x86_alu.h"

struct cpu {
    uint64_t r[16];
    uint64_t flags;
};

/* Loads every register but %rsp from *%rdi, EFLAGS too, runs 16 bytes of
 * instruction (NOP-padded), and stores them all back. */
extern const char tramp_start[], tramp_insn[], tramp_end[];
__asm__(
    ".pushsection .rodata\n"
    "tramp_start:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  push %rdi\n"
    "  pushq 128(%rdi)\n  popfq\n"
    "  mov 0(%rdi),%rax\n  mov 8(%rdi),%rcx\n  mov 16(%rdi),%rdx\n  mov 24(%rdi),%rbx\n"
    "  mov 40(%rdi),%rbp\n  mov 48(%rdi),%rsi\n"
    "  mov 64(%rdi),%r8\n  mov 72(%rdi),%r9\n  mov 80(%rdi),%r10\n  mov 88(%rdi),%r11\n"
    "  mov 96(%rdi),%r12\n  mov 104(%rdi),%r13\n  mov 112(%rdi),%r14\n  mov 120(%rdi),%r15\n"
    "  mov 56(%rdi),%rdi\n"
    "tramp_insn:\n"
    "  .fill 16,1,0x90\n"
    "  push %rdi\n"
    "  mov 8(%rsp),%rdi\n"
    "  mov %rax,0(%rdi)\n  mov %rcx,8(%rdi)\n  mov %rdx,16(%rdi)\n  mov %rbx,24(%rdi)\n"
    "  mov %rbp,40(%rdi)\n  mov %rsi,48(%rdi)\n"
    "  mov %r8,64(%rdi)\n  mov %r9,72(%rdi)\n  mov %r10,80(%rdi)\n  mov %r11,88(%rdi)\n"
    "  mov %r12,96(%rdi)\n  mov %r13,104(%rdi)\n  mov %r14,112(%rdi)\n  mov %r15,120(%rdi)\n"
    "  pop %rax\n  mov %rax,56(%rdi)\n"
    "  pushfq\n  pop %rax\n  mov %rax,128(%rdi)\n"
    "  add $8,%rsp\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
    "  ret\n"
    "tramp_end:\n"
    ".popsection\n");

static uint8_t *tramp;

static void on_cpu(const uint8_t *insn, int len, struct cpu *c)
{
    uint8_t *slot = tramp + (tramp_insn - tramp_start);
    memset(slot, 0x90, 16);
    memcpy(slot, insn, (size_t)len);
    __builtin___clear_cache((char *)slot, (char *)slot + 16);
    ((void (*)(struct cpu *))tramp)(c);
}

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* An operand value: edges (0, 1, all ones, the sign bits) as often as noise. */
static uint64_t value(void)
{
    static const uint64_t edge[] = {0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fffffff,
                                    0x80000000, 0xffffffff, 0x7fffffffffffffffull, 0x8000000000000000ull,
                                    ~0ull, 0xf, 0x10};
    uint64_t v = rnd();
    switch (rnd() % 4) {
    case 0: return edge[rnd() % (sizeof edge / sizeof edge[0])];
    case 1: return edge[rnd() % (sizeof edge / sizeof edge[0])] ^ (v & 0xf0);
    default: return v;
    }
}

/* A random instruction of one of the accepted forms (possibly refused: the
 * caller checks decoding).  Returns its length. */
static int make(uint8_t *b)
{
    int i = 0;
    int kind = (int)(rnd() % 16);
    int p66 = rnd() % 5 == 0;
    uint8_t rex = rnd() % 2 ? (uint8_t)(0x40 | (rnd() & 15)) : 0;
    if (p66)
        b[i++] = 0x66;
    if (rex)
        b[i++] = rex;
    uint8_t modrm = (uint8_t)(0xc0 | (rnd() & 0x3f));
    switch (kind) {
    case 0: case 1: case 2: {             /* ALU family, all six forms */
        uint8_t op = (uint8_t)(((rnd() % 8) << 3) | (rnd() % 6));
        b[i++] = op;
        if ((op & 7) < 4) {
            b[i++] = modrm;
        } else if ((op & 7) == 4) {
            b[i++] = (uint8_t)rnd();
        } else {
            int n = p66 && !(rex & 8) ? 2 : 4;
            for (int k = 0; k < n; k++)
                b[i++] = (uint8_t)(k == n - 1 && rnd() % 2 ? 0x80 | rnd() : rnd());
        }
        break;
    }
    case 3: case 4: {                     /* 80, 81, 83 */
        static const uint8_t ops[] = {0x80, 0x81, 0x83};
        uint8_t op = ops[rnd() % 3];
        b[i++] = op;
        b[i++] = modrm;
        int n = op == 0x81 ? (p66 && !(rex & 8) ? 2 : 4) : 1;
        for (int k = 0; k < n; k++)
            b[i++] = (uint8_t)value();
        break;
    }
    case 5:                               /* TEST r/m, reg */
        b[i++] = (uint8_t)(0x84 | (rnd() & 1));
        b[i++] = modrm;
        break;
    case 6: {                             /* TEST AL/eAX, imm */
        uint8_t op = (uint8_t)(0xa8 | (rnd() & 1));
        b[i++] = op;
        int n = op == 0xa8 ? 1 : p66 && !(rex & 8) ? 2 : 4;
        for (int k = 0; k < n; k++)
            b[i++] = (uint8_t)value();
        break;
    }
    case 7: case 8: {                     /* F6/F7 /0 /2 /3, FE/FF /0 /1 */
        static const uint8_t ops[] = {0xf6, 0xf7, 0xfe, 0xff};
        uint8_t op = ops[rnd() % 4];
        int reg = (op & 0xfe) == 0xf6 ? (int[]){0, 2, 3}[rnd() % 3] : (int)(rnd() % 2);
        b[i++] = op;
        b[i++] = (uint8_t)((modrm & ~0x38) | (reg << 3));
        if ((op & 0xfe) == 0xf6 && reg == 0) {
            int n = op == 0xf6 ? 1 : p66 && !(rex & 8) ? 2 : 4;
            for (int k = 0; k < n; k++)
                b[i++] = (uint8_t)value();
        }
        break;
    }
    case 9:                               /* MOV r/m, reg and reg, r/m */
        b[i++] = (uint8_t)(0x88 | (rnd() & 3));
        b[i++] = modrm;
        break;
    case 10: {                            /* MOV reg, imm (B0-BF) */
        uint8_t op = (uint8_t)(0xb0 | (rnd() & 15));
        b[i++] = op;
        int n = op < 0xb8 ? 1 : (rex & 8) ? 8 : p66 ? 2 : 4;
        for (int k = 0; k < n; k++)
            b[i++] = (uint8_t)value();
        break;
    }
    case 11: {                            /* MOV r/m, imm (C7 /0) */
        b[i++] = 0xc7;
        b[i++] = (uint8_t)(modrm & ~0x38);
        int n = p66 && !(rex & 8) ? 2 : 4;
        for (int k = 0; k < n; k++)
            b[i++] = (uint8_t)value();
        break;
    }
    default: {                            /* SETcc on a register (for x86_cond), with no prefixes */
        i = 0;
        b[i++] = 0x0f;
        b[i++] = (uint8_t)(0x90 | (rnd() & 15));
        b[i++] = 0xc0;                    /* %al */
        break;
    }
    }
    return i;
}

static void random_cpu(struct cpu *c)
{
    for (int k = 0; k < 16; k++)
        c->r[k] = value();
    c->r[4] = 0;                          /* (%rsp: not loaded; never an operand) */
    c->flags = 0x202 | (rnd() & X86_FLAGS_ARITH);
}

static int compare(const char *what, const uint8_t *b, int len, const struct cpu *in, const struct cpu *cpu,
                   const struct cpu *emu)
{
    int bad = 0;
    for (int k = 0; k < 16; k++)
        if (k != 4 && cpu->r[k] != emu->r[k])
            bad = 1;
    if ((cpu->flags ^ emu->flags) & X86_FLAGS_ARITH)
        bad = 1;
    if (!bad)
        return 0;
    printf("MISMATCH %s:", what);
    for (int k = 0; k < len; k++)
        printf(" %02x", b[k]);
    printf("\n  flags in %#llx cpu %#llx emu %#llx\n", (unsigned long long)in->flags,
           (unsigned long long)cpu->flags, (unsigned long long)emu->flags);
    for (int k = 0; k < 16; k++)
        if (cpu->r[k] != emu->r[k] || in->r[k] != cpu->r[k])
            printf("  r%d in %#llx cpu %#llx emu %#llx\n", k, (unsigned long long)in->r[k],
                   (unsigned long long)cpu->r[k], (unsigned long long)emu->r[k]);
    return 1;
}

/* Forms the emulator must refuse, and what it must decode them as. */
static int refusals(void)
{
    static const struct { uint8_t b[8]; int len; } no[] = {
        {{0x01, 0x03}, 2},                  /* add %eax,(%rbx): memory */
        {{0x48, 0x83, 0xc4, 0x08}, 4},      /* add $8,%rsp */
        {{0x48, 0x89, 0xe0}, 3},            /* mov %rsp,%rax */
        {{0x40, 0x80, 0xc4, 0x01}, 4},      /* add $1,%spl */
        {{0xff, 0xd0}, 2},                  /* call *%rax */
        {{0xe8, 0, 0, 0, 0}, 5},            /* call */
        {{0xc3}, 1},                        /* ret */
        {{0x0f, 0x05}, 2},                  /* syscall */
        {{0xf3, 0xab}, 2},                  /* rep stos */
        {{0x66, 0xe9, 0, 0}, 4},            /* 16-bit jmp */
        {{0x2e, 0x74, 0x02}, 3},            /* cs-prefixed je (a branch hint): left to the CPU */
        {{0xf7, 0xf1}, 2},                  /* div %ecx */
        {{0x83, 0x05, 1, 0, 0, 0, 1}, 7},   /* addl $1,rip-relative: memory */
        {{0x81, 0xc0, 1, 0}, 4},            /* truncated immediate */
    };
    int bad = 0;
    for (size_t k = 0; k < sizeof no / sizeof no[0]; k++) {
        struct x86_op o;
        if (x86_decode_op(no[k].b, (size_t)no[k].len, &o) == 0) {
            printf("ACCEPTED refusal %zu\n", k);
            bad++;
        }
    }
    static const struct { uint8_t b[8]; int len, kind, cc; int64_t rel; } yes[] = {
        {{0x7c, 0xf6}, 2, XK_JCC, 0xc, -10},                     /* jl .-8 */
        {{0x0f, 0x85, 0x10, 0, 0, 0}, 6, XK_JCC, 0x5, 16},       /* jne rel32 */
        {{0xeb, 0x05}, 2, XK_JMP, 0, 5},
        {{0xe9, 0xfb, 0xff, 0xff, 0xff}, 5, XK_JMP, 0, -5},
        {{0xf3, 0x90}, 2, XK_PAUSE, 0, 0},
    };
    for (size_t k = 0; k < sizeof yes / sizeof yes[0]; k++) {
        struct x86_op o;
        if (x86_decode_op(yes[k].b, (size_t)yes[k].len, &o) != 0 || o.kind != yes[k].kind || o.len != yes[k].len
            || (o.kind == XK_JCC && o.cc != yes[k].cc) || o.rel != yes[k].rel) {
            printf("MISDECODED branch %zu\n", k);
            bad++;
        }
    }
    return bad;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 0) | 1 : 0x9e3779b97f4a7c15ull;
    size_t tsize = (size_t)(tramp_end - tramp_start);
    tramp = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tramp == MAP_FAILED)
        return 2;
    memcpy(tramp, tramp_start, tsize);
    long cases = 0, refused = 0, mismatches = refusals();
    long per_kind[3] = {0};
    while (cases < n) {
        uint8_t b[16];
        int len = make(b);
        struct cpu in, cpu, emu;
        random_cpu(&in);
        cpu = emu = in;
        if (b[0] == 0x0f && (b[1] & 0xf0) == 0x90) {          /* SETcc: the condition */
            on_cpu(b, len, &cpu);
            int cc = b[1] & 15;
            emu.r[0] = (emu.r[0] & ~0xffull) | (uint64_t)x86_cond(cc, in.flags);
            mismatches += compare("setcc", b, len, &in, &cpu, &emu);
            per_kind[2]++;
            cases++;
            continue;
        }
        struct x86_op o;
        if (x86_decode_op(b, (size_t)len, &o) < 0) {
            refused++;                    /* (%rsp, an 8-bit %spl..: left to the CPU) */
            continue;
        }
        if (o.len != len) {
            printf("LENGTH %d, not %d:", o.len, len);
            for (int k = 0; k < len; k++)
                printf(" %02x", b[k]);
            printf("\n");
            mismatches++;
            continue;
        }
        on_cpu(b, len, &cpu);
        x86_exec(&o, emu.r, &emu.flags);
        mismatches += compare("alu", b, len, &in, &cpu, &emu);
        per_kind[o.op == ALU_MOV]++;
        cases++;
    }
    printf("cases=%ld alu=%ld mov=%ld setcc=%ld refused=%ld mismatches=%ld\n", cases, per_kind[0], per_kind[1],
           per_kind[2], refused, mismatches);
    return mismatches ? 1 : 0;
}
