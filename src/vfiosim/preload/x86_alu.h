/*
 * x86_alu.h -- the register-only x86-64 instructions the shim's run-ahead
 * emulates between a driver's BAR accesses: integer arithmetic and logic on
 * registers and immediates (with EFLAGS as the CPU computes them), moves
 * between registers, and relative jumps.  Loops that store to or poll a
 * device register are made of these (`add $1,%rax; cmp %r13,%rax; jl`,
 * `test $1,%al; jne`), so run-ahead can follow a loop around instead of
 * trapping once per access.
 *
 * No memory operand is decoded here: a memory access is either a device
 * access (the shim's own MOV decoder) or it ends the run.  Nothing touches
 * %rsp either.  Anything not decoded ends the run, and the CPU executes it.
 *
 * tests/c/x86_alu_check.c runs every form here on the CPU and through
 * x86_exec() with random operands and flags and compares the results.
 */
#ifndef VFIOSIM_X86_ALU_H
#define VFIOSIM_X86_ALU_H

#include <stdint.h>
#include <string.h>

/* Operations, in the order of the ALU opcode families 00-3F (op >> 3). */
enum { ALU_ADD, ALU_OR, ALU_ADC, ALU_SBB, ALU_AND, ALU_SUB, ALU_XOR, ALU_CMP,
       ALU_TEST, ALU_INC, ALU_DEC, ALU_NOT, ALU_NEG, ALU_MOV };

enum { XK_ALU = 1, XK_JCC, XK_JMP, XK_PAUSE };

#define X86_REG_RSP 4
#define X86_FLAGS_ARITH 0x8d5ull      /* OF, SF, ZF, AF, PF, CF */

struct x86_op {
    int len, kind;                    /* bytes; XK_* */
    int op, size;                     /* ALU_*; operand bytes */
    int dst, dst_high8;               /* register number 0-15; AH/CH/DH/BH */
    int src, src_high8;               /* register number, or -1: the immediate */
    uint64_t imm;                     /* already extended to the operand size */
    int cc;                           /* XK_JCC: condition 0-15 (the opcode's low nibble) */
    int64_t rel;                      /* XK_JCC, XK_JMP: from the next instruction */
};

static inline uint64_t x86_mask(int size)
{
    return size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

/* Decode the instruction at p (only `avail` bytes may be read) if it is one
 * of the forms above; 0, or -1 if it is not. */
static int x86_decode_op(const uint8_t *p, size_t avail, struct x86_op *o)
{
    size_t i = 0;
    int opsize16 = 0, rep = 0, rex = 0;
#define XNEED(n) do { if (i + (n) > avail) return -1; } while (0)
    memset(o, 0, sizeof *o);
    o->src = -1;
    for (;;) {
        XNEED(1);
        if (p[i] == 0x66)
            opsize16 = 1;
        else if (p[i] == 0xf3)
            rep = 1;
        else
            break;
        if (++i > 4)
            return -1;
    }
    XNEED(1);
    if ((p[i] & 0xf0) == 0x40)
        rex = p[i++];
    XNEED(1);
    uint8_t op = p[i++];
    int opsz = (rex & 8) ? 8 : opsize16 ? 2 : 4;
    if (rep) {                        /* f3 90: PAUSE, in spin loops */
        if (op != 0x90 || rex || opsize16)
            return -1;
        o->kind = XK_PAUSE;
        o->len = (int)i;
        return 0;
    }
    int modrm_dst = 0, modrm_src = 0; /* 1: the r/m field (a register), 2: the reg field */
    int imm_bytes = 0, imm_sext = 0, reg_op = -1;
    o->kind = XK_ALU;
    if (op < 0x40 && (op & 7) < 6) {  /* ADD OR ADC SBB AND SUB XOR CMP */
        o->op = op >> 3;
        switch (op & 7) {
        case 0: o->size = 1; modrm_dst = 1; modrm_src = 2; break;
        case 1: o->size = opsz; modrm_dst = 1; modrm_src = 2; break;
        case 2: o->size = 1; modrm_dst = 2; modrm_src = 1; break;
        case 3: o->size = opsz; modrm_dst = 2; modrm_src = 1; break;
        case 4: o->size = 1; o->dst = 0; imm_bytes = 1; break;
        default: o->size = opsz; o->dst = 0; imm_bytes = opsz == 2 ? 2 : 4; imm_sext = 1; break;
        }
    } else if (op == 0x80 || op == 0x81 || op == 0x83) {
        o->size = op == 0x80 ? 1 : opsz;
        modrm_dst = 1;
        reg_op = 0;                   /* the reg field is the operation */
        imm_bytes = op == 0x81 ? (opsz == 2 ? 2 : 4) : 1;
        imm_sext = op != 0x80;
    } else if (op == 0x84 || op == 0x85) {
        o->op = ALU_TEST;
        o->size = op == 0x84 ? 1 : opsz;
        modrm_dst = 1;
        modrm_src = 2;
    } else if (op == 0xa8 || op == 0xa9) {
        o->op = ALU_TEST;
        o->size = op == 0xa8 ? 1 : opsz;
        imm_bytes = op == 0xa8 ? 1 : opsz == 2 ? 2 : 4;
        imm_sext = 1;
    } else if (op == 0xf6 || op == 0xf7 || op == 0xfe || op == 0xff) {
        o->size = (op & 1) ? opsz : 1;
        modrm_dst = 1;
        reg_op = 1;                   /* /0 TEST, /2 NOT, /3 NEG (f6, f7); /0 INC, /1 DEC (fe, ff) */
    } else if (op >= 0x88 && op <= 0x8b) {
        o->op = ALU_MOV;
        o->size = (op & 1) ? opsz : 1;
        modrm_dst = (op & 2) ? 2 : 1;
        modrm_src = (op & 2) ? 1 : 2;
    } else if (op >= 0xb0 && op <= 0xbf) {
        o->op = ALU_MOV;
        o->size = op < 0xb8 ? 1 : opsz;
        o->dst = (op & 7) | ((rex & 1) ? 8 : 0);
        o->dst_high8 = o->size == 1 && !rex && (op & 7) >= 4;
        if (o->dst_high8)
            o->dst -= 4;
        imm_bytes = o->size == 8 ? 8 : o->size;
    } else if (op == 0xc7) {
        o->op = ALU_MOV;
        o->size = opsz;
        modrm_dst = 1;
        reg_op = 2;                   /* /0 only */
        imm_bytes = opsz == 2 ? 2 : 4;
        imm_sext = 1;
    } else if (op >= 0x70 && op <= 0x7f) {
        XNEED(1);
        o->kind = XK_JCC;
        o->cc = op & 15;
        o->rel = (int8_t)p[i++];
        o->len = (int)i;
        return opsize16 ? -1 : 0;
    } else if (op == 0xeb || op == 0xe9) {
        int n = op == 0xeb ? 1 : 4;
        XNEED((size_t)n);
        int32_t d = 0;
        if (n == 1) {
            d = (int8_t)p[i];
        } else {
            memcpy(&d, p + i, 4);
        }
        i += (size_t)n;
        o->kind = XK_JMP;
        o->rel = d;
        o->len = (int)i;
        return opsize16 ? -1 : 0;     /* (a 16-bit jump truncates RIP on some CPUs) */
    } else if (op == 0x0f) {
        XNEED(5);
        uint8_t op2 = p[i++];
        if (op2 < 0x80 || op2 > 0x8f || opsize16)
            return -1;
        int32_t d;
        memcpy(&d, p + i, 4);
        i += 4;
        o->kind = XK_JCC;
        o->cc = op2 & 15;
        o->rel = d;
        o->len = (int)i;
        return 0;
    } else {
        return -1;
    }
    if (modrm_dst || modrm_src) {
        XNEED(1);
        uint8_t modrm = p[i++];
        int mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7;
        if (mod != 3)
            return -1;                /* a memory operand */
        int regn = reg | ((rex & 4) ? 8 : 0), rmn = rm | ((rex & 1) ? 8 : 0);
        int reg_h8 = o->size == 1 && !rex && reg >= 4, rm_h8 = o->size == 1 && !rex && rm >= 4;
        if (reg_h8)
            regn = reg - 4;
        if (rm_h8)
            rmn = rm - 4;
        if (reg_op == 0) {
            o->op = reg;
        } else if (reg_op == 1) {
            static const int f6[8] = {ALU_TEST, -1, ALU_NOT, ALU_NEG, -1, -1, -1, -1};
            static const int fe[8] = {ALU_INC, ALU_DEC, -1, -1, -1, -1, -1, -1};
            o->op = (op == 0xf6 || op == 0xf7) ? f6[reg] : fe[reg];
            if (o->op < 0)
                return -1;
            if (o->op == ALU_TEST) {
                imm_bytes = o->size == 1 ? 1 : o->size == 2 ? 2 : 4;
                imm_sext = 1;
            }
        } else if (reg_op == 2 && reg != 0) {
            return -1;
        }
        if (modrm_dst == 1) {
            o->dst = rmn;
            o->dst_high8 = rm_h8;
        } else if (modrm_dst == 2) {
            o->dst = regn;
            o->dst_high8 = reg_h8;
        }
        if (modrm_src == 1) {
            o->src = rmn;
            o->src_high8 = rm_h8;
        } else if (modrm_src == 2) {
            o->src = regn;
            o->src_high8 = reg_h8;
        }
    }
    if (imm_bytes) {
        XNEED((size_t)imm_bytes);
        uint64_t v = 0;
        memcpy(&v, p + i, (size_t)imm_bytes);
        i += (size_t)imm_bytes;
        if (imm_sext && imm_bytes < 8) {
            int shift = 64 - 8 * imm_bytes;
            v = (uint64_t)((int64_t)(v << shift) >> shift);
        }
        o->imm = v & x86_mask(o->size);
    }
    if (o->dst == X86_REG_RSP && !o->dst_high8)
        return -1;                    /* the stack pointer: left to the CPU */
    if (o->src == X86_REG_RSP && !o->src_high8)
        return -1;
    o->len = (int)i;
    return 0;
#undef XNEED
}

static inline uint64_t x86_get(const uint64_t *r, int n, int high8, int size)
{
    return (high8 ? r[n] >> 8 : r[n]) & x86_mask(size);
}

static inline void x86_put(uint64_t *r, int n, int high8, int size, uint64_t v)
{
    switch (size) {
    case 1:
        if (high8)
            r[n] = (r[n] & ~0xff00ull) | ((v & 0xff) << 8);
        else
            r[n] = (r[n] & ~0xffull) | (v & 0xff);
        break;
    case 2:
        r[n] = (r[n] & ~0xffffull) | (v & 0xffff);
        break;
    case 4:
        r[n] = v & 0xffffffffull;     /* a 32-bit destination zero-extends */
        break;
    default:
        r[n] = v;
    }
}

/* ZF, SF and PF of a result of `size` bytes. */
static inline uint64_t x86_zsp(uint64_t res, int size)
{
    uint64_t f = 0;
    if (res == 0)
        f |= 1ull << 6;
    if (res >> (8 * size - 1))
        f |= 1ull << 7;
    if (!__builtin_parity((unsigned)(res & 0xff)))
        f |= 1ull << 2;
    return f;
}

/* Execute an XK_ALU op on registers r[16] (in encoding order) and *flags. */
static void x86_exec(const struct x86_op *o, uint64_t *r, uint64_t *flags)
{
    int size = o->size, bits = 8 * size;
    uint64_t m = x86_mask(size), sign = 1ull << (bits - 1);
    uint64_t a = x86_get(r, o->dst, o->dst_high8, size);
    uint64_t b = o->src >= 0 ? x86_get(r, o->src, o->src_high8, size) : o->imm;
    uint64_t res, f = 0, cin = *flags & 1;
    int write = 1, arith = 1;
    switch (o->op) {
    case ALU_MOV:
        x86_put(r, o->dst, o->dst_high8, size, b);
        return;
    case ALU_NOT:
        x86_put(r, o->dst, o->dst_high8, size, ~a & m);
        return;
    case ALU_INC: case ALU_DEC:
        b = 1;
        cin = 0;
        /* fall through */
    case ALU_ADD: case ALU_ADC: case ALU_SUB: case ALU_SBB: case ALU_CMP: case ALU_NEG: {
        int sub = o->op == ALU_SUB || o->op == ALU_SBB || o->op == ALU_CMP || o->op == ALU_DEC || o->op == ALU_NEG;
        if (o->op == ALU_NEG) {
            b = a;
            a = 0;
        }
        if (o->op != ALU_ADC && o->op != ALU_SBB)
            cin = 0;
        unsigned __int128 full;
        if (sub) {
            full = (unsigned __int128)a - b - cin;
            res = (uint64_t)full & m;
            if ((unsigned __int128)a < (unsigned __int128)b + cin)
                f |= 1;               /* borrow */
            if ((a ^ b) & (a ^ res) & sign)
                f |= 1ull << 11;
        } else {
            full = (unsigned __int128)a + b + cin;
            res = (uint64_t)full & m;
            if ((full >> bits) & 1)
                f |= 1;
            if ((a ^ res) & (b ^ res) & sign)
                f |= 1ull << 11;
        }
        if ((a ^ b ^ res) & 0x10)
            f |= 1ull << 4;
        write = o->op != ALU_CMP;
        break;
    }
    default:                          /* AND OR XOR TEST: CF = OF = AF = 0 */
        arith = 0;
        res = o->op == ALU_OR ? a | b : o->op == ALU_XOR ? a ^ b : a & b;
        write = o->op != ALU_TEST;
        break;
    }
    (void)arith;
    f |= x86_zsp(res, size);
    if (o->op == ALU_INC || o->op == ALU_DEC)
        f = (f & ~1ull) | (*flags & 1);                   /* INC and DEC keep CF */
    *flags = (*flags & ~X86_FLAGS_ARITH) | f;
    if (write)
        x86_put(r, o->dst, o->dst_high8, size, res);
}

/* Whether condition cc (Jcc's and SETcc's low nibble) holds for `flags`. */
static inline int x86_cond(int cc, uint64_t flags)
{
    int cf = flags & 1, pf = (flags >> 2) & 1, zf = (flags >> 6) & 1, sf = (flags >> 7) & 1, of = (flags >> 11) & 1;
    int r;
    switch (cc >> 1) {
    case 0: r = of; break;
    case 1: r = cf; break;
    case 2: r = zf; break;
    case 3: r = cf | zf; break;
    case 4: r = sf; break;
    case 5: r = pf; break;
    case 6: r = sf != of; break;
    default: r = zf | (sf != of); break;
    }
    return (cc & 1) ? !r : r;
}

#endif
