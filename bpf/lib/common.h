/* Constants and the runtime knobs fixed when the daemon loads the programs. */

#ifndef TETHER_LIB_COMMON_H
#define TETHER_LIB_COMMON_H

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define AF_NETLINK 16
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SIGKILL 9
#define SIGSTOP 19
#define EPERM 1
#define TETHER_NO_SLOT 0xffffffff

#define AF_VSOCK 40
#define NETLINK_ROUTE 0
#define FMODE_WRITE 0x2
#define TETHER_CGROUP2_MAGIC 0x63677270
#define TETHER_TCP_LISTEN 10
#ifndef bpf_ksym_exists
#define bpf_ksym_exists(sym) ({ _Static_assert(!__builtin_constant_p(!!sym), #sym " should be marked as __weak"); !!sym; })
#endif

/* Makes clang keep a bounds-checked value in a register the verifier has seen checked. */
#define tether_barrier_var(v) asm volatile("" : "=r"(v) : "0"(v))

/* Runtime knobs, fixed when the daemon loads the programs. */
/* Emit one allow event in every tether_allow_sample allows (0: none). Denies are always emitted. */
const volatile __u32 tether_allow_sample = 0;
/* Network verdict for a cgroup under an agent parent that is bound to no agent (0: deny). */
const volatile __u8 tether_unknown_cgroup_allow = 0;
/* Enforce exec from tp_btf/sched_process_exec with SIGKILL (the LSM program is not attached). */
const volatile __u8 tether_exec_signal = 1;

#endif /* TETHER_LIB_COMMON_H */
