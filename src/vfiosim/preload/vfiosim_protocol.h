/*
 * vfiosim_protocol.h -- the wire between the preload shim and the vfiosim daemon.
 *
 * Included by the shim (vfiosim_preload.c) and by the daemon's helper library
 * (vfiosim_daemon.c); src/vfiosim/transport/protocol.py declares the same
 * numbers and layouts for the Python side, and tests/test_protocol_abi.py
 * compiles this header and checks that the two agree.
 *
 * A connection is a SOCK_SEQPACKET Unix socket, used for the hello and for
 * passing file descriptors; every call after the hello travels through a
 * shared-memory channel (struct vchan) the daemon hands over with the hello
 * reply: the program writes a request and bumps req_seq (and wake_seq, the
 * word the daemon sleeps on, which a side-effecting posted store bumps too),
 * the daemon answers and sets rep_seq, each side spinning briefly and then
 * sleeping on the other's word with futex(2).  All integers are little-endian (host order).
 */
#ifndef VFIOSIM_PROTOCOL_H
#define VFIOSIM_PROTOCOL_H

#include <stdint.h>

#define VFIOSIM_MAGIC_VERSION 0x56460004u /* "VF", protocol version 4 */

/* Operations (struct vreq.op). */
#define VOP_HELLO 1  /* socket; a[0] = magic, flags = HELLO_*, SCM_CREDENTIALS; reply: root, SCM_RIGHTS channel */
#define VOP_OPEN 2   /* fd = placeholder, a[0] = flags, a[1] = mode, payload = path */
#define VOP_CLOSE 3  /* fd */
#define VOP_IOCTL 4  /* fd, a[0] = cmd, a[1] = arg, fd2 = placeholder for a new fd or -1; window (below) */
#define VOP_READ 5   /* fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL); window */
#define VOP_WRITE 6  /* fd, a[0] = buffer, a[1] = count, a[2] = offset (flags & RW_POSITIONAL); window */
#define VOP_DUP 7    /* fd = old, fd2 = new, a[0] = cloexec */
#define VOP_SETFD 8  /* fd, a[0] = cloexec */
#define VOP_MMAP 9   /* fd, a[0] = offset, a[1] = length, a[2] = prot, a[3] = shared, a[4] = address;
                        ret = handle; reply: vmap */
#define VOP_MMIO 10  /* a[0] = handle, a[1] = offset in the mapping, a[2] = size, a[3] = value (MMIO_WRITE) */
#define VOP_MUNMAP 11 /* a[0] = handle */
#define VOP_STATUS 12 /* reply payload: u64 VmLck kB, u64 VmPin kB */
#define VOP_FORK 13  /* a[0] = child pid (sent by the parent right after fork()) */
#define VOP_INFO 14  /* socket, no hello needed; reply payload: the fake root */
#define VOP_SETATTR 15 /* chown/chmod of a node: payload = path (or fd >= 0), a[0] = uid, a[1] = gid,
                          a[2] = mode, flags = SETATTR_* */
#define VOP_FLUSH 16 /* nothing but the posted stores before it (a no-op call: an ordering point) */

/* Flags. */
#define VF_REFRESH_CREDS (1u << 8) /* the program called a libc function that changes ids, caps or limits */
/* The window: with VF_WINDOW, the payload is a copy of the program's memory
 * at a[4] (a pointer argument), made as the program can read it; with
 * VF_WINDOW_WRITABLE the program can write it too.  The daemon reads and
 * writes those bytes in the copy; the reply's payload is then what the
 * program stores back: u32 offset from a[4], then the bytes. */
#define VF_WINDOW (1u << 9)
#define VF_WINDOW_WRITABLE (1u << 10)
#define VWIN_MAX 512
#define VRW_POSITIONAL 1u
#define VMMIO_WRITE 1u
#define VHELLO_FORK 1u             /* sent by a fork child (its parent sends VOP_FORK) */
#define VSETATTR_OWNER 1u
#define VSETATTR_MODE 2u

#define VMAX_PAYLOAD 4096          /* a path (PATH_MAX), or a reply's data */

struct vreq {
    uint32_t op, flags;
    int32_t fd, fd2;
    uint64_t a[5];
    uint32_t len, reserved;
};

struct vrep {
    int64_t ret;
    int32_t err;
    uint32_t len;
};

/* The reply payload of VOP_MMAP: how the program may reach the mapping without
 * a round trip.  Offsets are from the start of the mapping. */
#define VMAP_MAX_POSTED 64
#define VMAP_MAX_RAM 8
#define VPOST_KICK 1u              /* a store here has side effects: wake the daemon to perform it */
struct vmap_post {
    uint64_t offset;
    uint32_t length, flags;        /* flags: VPOST_* */
};
struct vmap_range {
    uint64_t offset, length;
    uint64_t fd_offset;            /* RAM: where the range starts in the memfd sent after the reply */
};
struct vmap {
    uint32_t slot;                 /* index in vchan.live[]: 1 while stores may be posted */
    uint32_t nposted;              /* ranges where a store may be posted */
    uint32_t nram;                 /* ranges that are memory: mapped from a memfd (SCM_RIGHTS on the socket) */
    uint32_t reserved;
    struct vmap_post posted[VMAP_MAX_POSTED];
    struct vmap_range ram[VMAP_MAX_RAM];
};

/* A posted store: performed by the daemon, in order, before anything else the
 * program asks for (the next request); a store with side effects (a doorbell,
 * a command) as soon as the daemon can (it kicks wake_seq), the others when
 * the daemon next wakes. */
struct vpost {
    uint64_t handle, offset, value;
    uint32_t size, flags;          /* flags: VPOST_KICK for a store with side effects */
};

#define VRING 256                  /* posted stores the channel holds */
#define VLIVE 64                   /* mapping slots */

/* Each side spins for the other only while the other is seen running, on
 * another CPU: the program for a reply while the serving thread was not
 * asleep or has taken its request (taken_seq), the daemon for the next
 * request while the program did not sleep or picked up the last reply
 * (ack_seq); neither while the other was last seen on its own CPU (cpu:
 * sched_getcpu() when it last looked).  Spins that end so -- the
 * CPUs are contended -- are counted (spin_fails), and the daemon then turns
 * spinning off for the connection (spin = 0: both sides sleep at once) for a
 * while, and tries again. */
struct vchan_prog {                /* written by the program */
    uint32_t req_seq;              /* the last request */
    uint32_t prog_waiting;         /* the program sleeps on rep_seq: wake it */
    uint32_t ring_head;            /* posted stores written */
    uint32_t ack_seq;              /* the last reply the program picked up */
    uint32_t cpu;                  /* where the program last ran */
    uint32_t spin_fails;           /* spins for a reply that the CPUs' contention ended */
    uint32_t wake_seq;             /* futex: the daemon sleeps on it; bumped by requests and kicks */
    uint32_t pad[9];
};

struct vchan_daemon {              /* written by the daemon */
    uint32_t rep_seq;              /* futex: the program sleeps on it */
    uint32_t daemon_waiting;       /* the daemon sleeps on wake_seq: wake it */
    uint32_t ring_tail;            /* posted stores performed */
    uint32_t taken_seq;            /* the last request the daemon copied out */
    uint32_t cpu;                  /* where the serving thread last ran (took a request or posts) */
    uint32_t spin;                 /* 1: the program may spin for replies */
    uint32_t pad[10];
};

struct vchan {
    uint32_t magic, size;
    uint32_t pad0[14];
    struct vchan_prog prog;
    struct vchan_daemon daemon;
    uint32_t live[VLIVE];          /* per mapping slot, written by the daemon */
    struct vreq req;
    uint8_t req_payload[VMAX_PAYLOAD];
    struct vrep rep;
    uint8_t rep_payload[VMAX_PAYLOAD + sizeof(struct vmap)];
    struct vpost ring[VRING];
};

#define VCHAN_SIZE 32768u

#endif
