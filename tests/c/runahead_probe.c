/*
 * runahead_probe.c -- runs sequences of BAR loads and stores under
 * `vfiosim run` (tests/test_run_ahead.py), written in assembly so that each
 * addressing mode and instruction form is the one named, and prints what it
 * loaded and how many of the accesses trapped.
 *
 *   runahead_probe SCENARIO BDF     (the device in IOMMU group 5 of an x86 machine)
 *
 * Built with -no-pie: the BAR is mapped over `barwin`, a page of .bss, which
 * the sequences also reach RIP-relative and by absolute address.  Output:
 * key=value lines; traps= and ahead= are the shim's counters
 * (vfiosim_bar_traps, vfiosim_bar_run_ahead) over the scenario.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

uint8_t barwin[4096] __attribute__((aligned(4096)));

void stores(volatile void *bar);
void loads(volatile void *bar, uint64_t *out);
void interleaved(volatile void *bar, uint64_t *out);
void doorbell(volatile void *bar, uint64_t *out);
void ordinary(volatile void *bar, uint32_t *ro);
extern const char ordinary_native[];
void gs_prefix(volatile void *bar);
void store_loop(volatile void *bar, uint64_t n);
void poll_countdown(volatile void *bar);
uint64_t idle(volatile void *bar);
void jump_out(volatile void *bar);

__asm__(".text\n"
        /* Thirteen stores, one of each form; the first traps, the handler runs ahead to the rest. */
        ".globl stores\n"
        "stores:\n"
        "    push %rbx\n"
        "    push %r12\n"
        "    push %r13\n"
        "    movabs $0x1122334455667788, %rax\n"
        "    mov $1, %ecx\n"
        "    lea -0x1000(%rdi), %r13\n"
        "    mov $0xa1b2, %ebx\n"
        "    movabs $0x5566778899aabbcc, %r12\n"
        "    movl $0x11111111, (%rdi)\n"             /* C7, no displacement */
        "    movq $-2, 0x08(%rdi)\n"                 /* REX.W C7: imm32 sign-extended */
        "    movw $0x3344, 0x10(%rdi)\n"             /* 66 C7: imm16 */
        "    movb $0x55, 0x12(%rdi)\n"               /* C6: imm8 */
        "    mov %rax, 0x10(%rdi,%rcx,8)\n"          /* base + index*8 + disp8 */
        "    movl %eax, 0x1020(%r13)\n"              /* REX.B base + disp32 */
        "    movb %bh, 0x24(%rdi)\n"                 /* high-8 register */
        "    movb %bl, 0x25(%rdi)\n"
        "    movl %r12d, barwin+0x28(%rip)\n"        /* RIP-relative, REX.R */
        "    movw %r12w, 0x2c(%rdi)\n"               /* 66 REX 89 */
        "    movb %r12b, 0x2e(%rdi)\n"               /* REX 88: r12b, not a high-8 register */
        "    mov %r12, barwin+0x28(,%rcx,8)\n"       /* index*8 + disp32, no base */
        "    movl $0xdeadbeef, 0x200(%rdi)\n"        /* undeclared: a round trip, not posted */
        "    pop %r13\n"
        "    pop %r12\n"
        "    pop %rbx\n"
        "    ret\n"
        /* Nine loads of each form into registers primed with all-ones; then stored to out (natively). */
        ".globl loads\n"
        "loads:\n"
        "    push %rbx\n"
        "    push %r12\n"
        "    mov $-1, %rax\n"
        "    mov $-1, %rbx\n"
        "    mov $-1, %rcx\n"
        "    mov $-1, %rdx\n"
        "    mov $-1, %r8\n"
        "    mov $-1, %r9\n"
        "    mov $-1, %r10\n"
        "    mov $-1, %r11\n"
        "    mov $-1, %r12\n"
        "    mov 0x80(%rdi), %rax\n"                 /* 8 bytes */
        "    movzbl 0x88(%rdi), %ecx\n"              /* MOVZX byte, 32-bit destination */
        "    movswq 0x8a(%rdi), %rdx\n"              /* REX.W MOVSX word */
        "    movslq 0x8c(%rdi), %r8\n"               /* MOVSXD */
        "    movb 0x90(%rdi), %bh\n"                 /* high-8 destination */
        "    movl barwin+0x94(%rip), %r9d\n"         /* RIP-relative; zero-extends */
        "    movw 0x98(%rdi), %r10w\n"               /* 66 REX 8B: merges */
        "    movb 0x9a(%rdi), %r11b\n"               /* REX 8A: merges */
        "    movsbl 0x9b(%rdi), %r12d\n"             /* MOVSX byte, 32-bit destination */
        "    mov %rax, 0x00(%rsi)\n"
        "    mov %rcx, 0x08(%rsi)\n"
        "    mov %rdx, 0x10(%rsi)\n"
        "    mov %r8, 0x18(%rsi)\n"
        "    mov %rbx, 0x20(%rsi)\n"
        "    mov %r9, 0x28(%rsi)\n"
        "    mov %r10, 0x30(%rsi)\n"
        "    mov %r11, 0x38(%rsi)\n"
        "    mov %r12, 0x40(%rsi)\n"
        "    pop %r12\n"
        "    pop %rbx\n"
        "    ret\n"
        /* NOPs and LEAs are stepped over; an ADD, or a store to ordinary memory, ends a run. */
        ".globl interleaved\n"
        "interleaved:\n"
        "    mov $-1, %rcx\n"
        "    mov $-1, %r8\n"
        "    movl $1, 0x40(%rdi)\n"                  /* trap */
        "    nopl 0x0(%rax)\n"
        "    lea 0x48(%rdi), %rdx\n"
        "    movl $2, (%rdx)\n"                      /* run ahead */
        "    xchg %ax, %ax\n"                        /* 66 90 */
        "    add $4, %rdx\n"                         /* run ahead (register arithmetic) */
        "    imul $1, %rdx, %rdx\n"                  /* not emulated: stop */
        "    movl $3, (%rdx)\n"                      /* trap */
        "    movl $4, 0x50(%rdi)\n"                  /* run ahead */
        "    mov %rdx, (%rsi)\n"                     /* ordinary memory: stop */
        "    movl $5, 0x54(%rdi)\n"                  /* trap */
        "    lea 0x1234(%rdi), %cx\n"                /* 16-bit LEA: merges */
        "    lea 0x10(%rdi), %r8d\n"                 /* 32-bit LEA: zero-extends */
        "    nopw %cs:0x0(%rax,%rax,1)\n"
        "    movl $6, 0x58(%rdi)\n"                  /* run ahead */
        "    mov %rcx, 0x08(%rsi)\n"
        "    mov %r8, 0x10(%rsi)\n"
        "    ret\n"
        /* Posted stores, a doorbell after them, a load after that. */
        ".globl doorbell\n"
        "doorbell:\n"
        "    movl $0x41, 0x40(%rdi)\n"               /* trap */
        "    movl $0x42, 0x44(%rdi)\n"
        "    movq $0x4443, 0x48(%rdi)\n"
        "    movl $1, 0x100(%rdi)\n"                 /* side effect: the model snapshots 0x40-0x4f */
        "    movl $0x46, 0x4c(%rdi)\n"               /* after it */
        "    movl 0x104(%rdi), %eax\n"               /* how many doorbells */
        "    movl 0x4c(%rdi), %edx\n"
        "    mov %rax, (%rsi)\n"
        "    mov %rdx, 8(%rsi)\n"
        "    ret\n"
        /* A store to ordinary (read-only) memory after a run: the CPU makes it. */
        ".globl ordinary, ordinary_native\n"
        "ordinary:\n"
        "    movl $7, 0x60(%rdi)\n"                  /* trap */
        "    movl $8, 0x64(%rdi)\n"                  /* run ahead */
        "ordinary_native:\n"
        "    movl $9, (%rsi)\n"                      /* faults to the program's own handler */
        "    movl $10, 0x68(%rdi)\n"                 /* trap */
        "    ret\n"
        /* A %gs-relative store ends a run (the shim does not know the gs base), then traps itself. */
        ".globl gs_prefix\n"
        "gs_prefix:\n"
        "    movl $0x31, 0x70(%rdi)\n"               /* trap */
        "    movl $0x32, %gs:barwin+0x74\n"          /* gs base 0: the BAR; trap */
        "    movl $0x33, 0x78(%rdi)\n"               /* run ahead */
        "    ret\n"
        /* A store loop: run-ahead follows it around (ADD, CMP, JL), RUN_AHEAD_MAX
         * instructions (256 iterations) after each trap. */
        ".globl store_loop\n"
        "store_loop:\n"
        "    xor %eax, %eax\n"
        "1:  mov %eax, 0x80(%rdi)\n"
        "    add $1, %rax\n"
        "    cmp %rsi, %rax\n"
        "    jl 1b\n"
        "    ret\n"
        /* Arm the countdown, then poll it until it reads 0: one trap. */
        ".globl poll_countdown\n"
        "poll_countdown:\n"
        "    movl $5, 0x10c(%rdi)\n"
        "2:  movl 0x108(%rdi), %eax\n"
        "    pause\n"
        "    test %eax, %eax\n"
        "    jne 2b\n"
        "    ret\n"
        /* A store, 40 register instructions (more than RUN_AHEAD_IDLE), a store:
         * two traps, the arithmetic done by emulation and by the CPU. */
        ".globl idle\n"
        "idle:\n"
        "    mov $1000, %eax\n"
        "    movl $0x21, 0x40(%rdi)\n"
        "    .rept 40\n"
        "    add $3, %rax\n"
        "    .endr\n"
        "    movl $0x22, 0x44(%rdi)\n"
        "    ret\n"
        /* A jump to another page ends the run there: the CPU fetches it. */
        ".globl jump_out\n"
        "jump_out:\n"
        "    movl $0x23, 0x48(%rdi)\n"
        "    jmp far_page\n"
        "    .balign 4096\n"
        "far_page:\n"
        "    movl $0x24, 0x4c(%rdi)\n"
        "    movl $0x25, 0x50(%rdi)\n"
        "    ret\n");

static unsigned long *traps, *ahead;
static unsigned long traps0, ahead0;

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void count_from_here(void)
{
    traps0 = *traps;
    ahead0 = *ahead;
}

static void counts(void)
{
    printf("traps=%lu ahead=%lu\n", *traps - traps0, *ahead - ahead0);
}

/* The program's own SIGSEGV handler: a fault the shim does not own comes here. */
static volatile uintptr_t seen_rip, seen_addr;
static volatile int seen;
static void *fixup_page;
static int fixup_prot;

static void own_handler(int sig, siginfo_t *si, void *ucv)
{
    (void)sig;
    seen++;
    seen_rip = (uintptr_t)((ucontext_t *)ucv)->uc_mcontext.gregs[REG_RIP];
    seen_addr = (uintptr_t)si->si_addr;
    if (!fixup_page || mprotect(fixup_page, 4096, fixup_prot))
        _exit(3);
}

static void own_segv(void *page, int prot)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = own_handler;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, NULL);
    fixup_page = page;
    fixup_prot = prot;
}

/* Single-stepping (EFLAGS.TF, as a debugger's PTRACE_SINGLESTEP sets it):
 * every instruction traps on its own, so the handler does not run ahead. */
static volatile int steps;

static void on_step(int sig)
{
    (void)sig;
    steps++;
}

static void stepped(volatile void *bar)
{
    signal(SIGTRAP, on_step);
    count_from_here();
    __asm__ volatile("pushfq\n\torq $0x100, (%%rsp)\n\tpopfq" ::: "memory", "cc");
    stores(bar);
    __asm__ volatile("pushfq\n\tandq $~0x100, (%%rsp)\n\tpopfq" ::: "memory", "cc");
    counts();
    printf("stepped=%d\n", steps > 13);
}

/* Code on two pages, a store straddling them: the handler reads only the
 * page the CPU executed from, so it stops there; the straddling store is
 * fetched by the CPU (a fault on the second page, if it is not executable,
 * goes to the program), traps, and the rest runs ahead. */
static void straddle(volatile void *bar, int second_prot)
{
    uint8_t *code = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED)
        die("mmap code");
    uint8_t *p = code + 4096 - 3 * 7 - 3;            /* three stores, then one across the boundary */
    uint8_t *start = p;
    for (int k = 0; k < 6; k++) {
        uint8_t insn[7] = {0xc7, 0x47, (uint8_t)(4 * k), (uint8_t)(0x20 + k), 0, 0, 0};   /* movl $imm, d8(%rdi) */
        memcpy(p, insn, 7);
        p += 7;
    }
    *p = 0xc3;                                        /* ret */
    if (mprotect(code, 4096, PROT_READ | PROT_EXEC) || mprotect(code + 4096, 4096, second_prot))
        die("mprotect");
    own_segv(code + 4096, PROT_READ | PROT_EXEC);
    count_from_here();
    ((void (*)(volatile void *))start)(bar);
    counts();
    printf("handler=%d rip_is_straddler=%d addr_is_page2=%d\n", seen, seen_rip == (uintptr_t)(start + 21),
           seen_addr == (uintptr_t)(code + 4096));
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    traps = dlsym(RTLD_DEFAULT, "vfiosim_bar_traps");
    ahead = dlsym(RTLD_DEFAULT, "vfiosim_bar_run_ahead");
    if (!traps || !ahead) {
        fprintf(stderr, "not under vfiosim run\n");
        return 2;
    }
    int c = open("/dev/vfio/vfio", O_RDWR), g = open("/dev/vfio/5", O_RDWR);
    if (c < 0 || g < 0 || ioctl(g, VFIO_GROUP_SET_CONTAINER, &c) || ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        die("container");
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[2]);
    if (d < 0)
        die("device");
    volatile uint8_t *bar = mmap(barwin, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, d, 0);
    if (bar != barwin)
        die("mmap BAR0");
    const char *s = argv[1];
    uint64_t out[9];
    memset(out, 0, sizeof out);
    if (!strcmp(s, "stores")) {
        count_from_here();
        stores(bar);
        counts();
    } else if (!strcmp(s, "loads")) {
        count_from_here();
        loads(bar, out);
        counts();
        for (int i = 0; i < 9; i++)
            printf("out%d=%#llx\n", i, (unsigned long long)out[i]);
    } else if (!strcmp(s, "interleaved")) {
        count_from_here();
        interleaved(bar, out);
        counts();
        printf("rdx=%#llx rcx=%#llx r8=%#llx bar=%#llx\n", (unsigned long long)out[0],
               (unsigned long long)out[1], (unsigned long long)out[2], (unsigned long long)(uintptr_t)bar);
    } else if (!strcmp(s, "doorbell")) {
        count_from_here();
        doorbell(bar, out);
        counts();
        printf("doorbells=%llu last=%#llx\n", (unsigned long long)out[0], (unsigned long long)out[1]);
    } else if (!strcmp(s, "ordinary")) {
        uint32_t *ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        own_segv(ro, PROT_READ | PROT_WRITE);
        count_from_here();
        ordinary(bar, ro);
        counts();
        printf("handler=%d rip_ok=%d ro=%u\n", seen, seen_rip == (uintptr_t)ordinary_native, *ro);
    } else if (!strcmp(s, "gs")) {
        unsigned long gsbase = 1;
        if (syscall(SYS_arch_prctl, ARCH_GET_GS, &gsbase) || gsbase) {
            printf("gs base %#lx\n", gsbase);
            return 4;
        }
        count_from_here();
        gs_prefix(bar);
        counts();
    } else if (!strcmp(s, "store_loop")) {
        count_from_here();
        store_loop(bar, 3000);
        counts();
    } else if (!strcmp(s, "poll")) {
        count_from_here();
        poll_countdown(bar);
        counts();
    } else if (!strcmp(s, "idle")) {
        count_from_here();
        uint64_t rax = idle(bar);
        counts();
        printf("rax=%llu\n", (unsigned long long)rax);
    } else if (!strcmp(s, "jump_out")) {
        count_from_here();
        jump_out(bar);
        counts();
    } else if (!strcmp(s, "stepped")) {
        stepped(bar);
    } else if (!strcmp(s, "straddle-exec")) {
        straddle(bar, PROT_READ | PROT_EXEC);
    } else if (!strcmp(s, "straddle-noexec")) {
        straddle(bar, PROT_READ);
    } else if (!strcmp(s, "straddle-unmapped")) {
        straddle(bar, PROT_NONE);
    } else {
        return 2;
    }
    return 0;
}
