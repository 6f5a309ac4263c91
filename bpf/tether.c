//go:build ignore

/* tether's kernel data plane.
 *
 * Every hook answers one question without a userspace round trip: is the calling process part of a
 * registered agent, and does that agent's current rule set allow this connect, sendmsg, socket or
 * exec? The answer comes from pinned maps that the daemon fills:
 *
 *   tether_cgroups   cgroup id -> agent slot (hooks walk up TETHER_MAX_ANCESTORS levels)
 *   tether_agents    slot -> flags (active, killed)
 *   tether_rulesets  slot -> two rule-set buffers (LPM tries); tether_agents says which is in force,
 *                    so one 4-byte write switches an agent's whole rule set
 *   tether_hosts     (buffer, prefix) -> the buffer's egress rules for single addresses (/32, /128)
 *                    and for the buffer's bulk prefix length, looked up before the buffer's trie:
 *                    a hash update costs a fraction of a trie update, and host rules (resolved
 *                    names among them) and ranges of one size are most of an agent's egress
 *   tether_procs     tgid -> lineage (binary, parent) of agent processes
 *   tether_roots     container cgroup id -> the pod agent's exec rules are resolved in its root
 *
 * One exception waits for the daemon: in a pod agent, the first exec that no rule allows in a
 * container cgroup not in tether_roots is stopped (SIGSTOP) until the daemon has resolved the exec
 * rules inside that container's root, which exists only once the runtime has built it; the daemon
 * then continues or kills it (pkg/containers).
 *
 * Cgroup programs are attached at the agent parent cgroups only, so processes outside agents never
 * run them. The global tracing programs (exec, fork, exit) return at once for a process that is not
 * in a registered agent; they are the only programs that can signal a process, and they do so only
 * for a registered agent in enforce mode.
 */

#include "include/vmlinux.h"
#include "include/bpf_helpers.h"
#include "include/bpf_core_read.h"
#include "include/bpf_tracing.h"
#include "include/bpf_endian.h"
#include "tether.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#include "lib/common.h"
#include "lib/maps.h"
#include "lib/decision.h"
#include "lib/attribution.h"
#include "lib/events.h"
#include "lib/egress.h"
#include "lib/dns.h"
#include "lib/unix.h"
#include "lib/bind.h"
#include "lib/skb.h"
#include "lib/sweep.h"
#include "lib/exec.h"
#include "lib/guards.h"

SEC("cgroup/connect4")
int tether_connect4(struct bpf_sock_addr *ctx)
{
	return tether_inet4(ctx, TETHER_KIND_CONNECT4);
}

SEC("cgroup/connect6")
int tether_connect6(struct bpf_sock_addr *ctx)
{
	return tether_inet6(ctx, TETHER_KIND_CONNECT6);
}

SEC("cgroup/sendmsg4")
int tether_sendmsg4(struct bpf_sock_addr *ctx)
{
	return tether_inet4(ctx, TETHER_KIND_SENDMSG4);
}

SEC("cgroup/sendmsg6")
int tether_sendmsg6(struct bpf_sock_addr *ctx)
{
	return tether_inet6(ctx, TETHER_KIND_SENDMSG6);
}

/* A datagram from tetherd's DNS proxy, and the peer name of a socket whose DNS went there, say
 * the resolver the agent asked (see lib/dns.h). */
SEC("cgroup/recvmsg4")
int tether_recvmsg4(struct bpf_sock_addr *ctx)
{
	tether_dns_unredirect(ctx, 0);
	return 1;
}

SEC("cgroup/recvmsg6")
int tether_recvmsg6(struct bpf_sock_addr *ctx)
{
	tether_dns_unredirect(ctx, 1);
	return 1;
}

SEC("cgroup/getpeername4")
int tether_getpeername4(struct bpf_sock_addr *ctx)
{
	tether_dns_unredirect(ctx, 0);
	return 1;
}

SEC("cgroup/getpeername6")
int tether_getpeername6(struct bpf_sock_addr *ctx)
{
	tether_dns_unredirect(ctx, 1);
	return 1;
}

SEC("cgroup/connect_unix")
int tether_connect_unix(struct bpf_sock_addr *ctx)
{
	return tether_unix(ctx, TETHER_KIND_CONNECT_UNIX);
}

SEC("cgroup/sendmsg_unix")
int tether_sendmsg_unix(struct bpf_sock_addr *ctx)
{
	return tether_unix(ctx, TETHER_KIND_SENDMSG_UNIX);
}

/* Where the kernel has no cgroup unix hooks (before 6.7) but BPF LSM works, these enforce the same
 * unix rules from the LSM socket hooks. */
SEC("lsm/socket_connect")
int BPF_PROG(tether_connect_unix_lsm, struct socket *sock, struct sockaddr *address, int addrlen, int ret)
{
	struct tether_decision d = {};

	if (ret)
		return ret;
	if (BPF_CORE_READ(address, sa_family) != AF_UNIX || addrlen <= 2)
		return 0;
	d.kind = TETHER_KIND_CONNECT_UNIX;
	d.sock_type = BPF_CORE_READ(sock, type);
	return tether_unix_decide(&d, (const char *)address + 2, addrlen - 2, 1) ? 0 : -EPERM;
}

SEC("lsm/socket_sendmsg")
int BPF_PROG(tether_sendmsg_unix_lsm, struct socket *sock, struct msghdr *msg, int size, int ret)
{
	struct tether_decision d = {};

	if (ret)
		return ret;
	const char *name = BPF_CORE_READ(msg, msg_name);
	int namelen = BPF_CORE_READ(msg, msg_namelen);
	if (!name || namelen <= 2 || BPF_CORE_READ(sock, sk, __sk_common.skc_family) != AF_UNIX)
		return 0; /* a connected socket was checked when it connected */
	d.kind = TETHER_KIND_SENDMSG_UNIX;
	d.sock_type = BPF_CORE_READ(sock, type);
	return tether_unix_decide(&d, name + 2, namelen - 2, 1) ? 0 : -EPERM;
}

/* IP sockets whose traffic the address hooks above do not see (raw, ICMP, SCTP, MPTCP, ...) are
 * refused to agents: of AF_INET and AF_INET6 they get TCP and UDP. The kernel runs this hook for
 * inet sockets only; packet sockets are kept from agents by removing CAP_NET_RAW (tetherctl run). */
SEC("cgroup/sock_create")
int tether_sock_create(struct bpf_sock *sk)
{
	struct tether_decision d = {};
	__u32 family = sk->family, type = sk->type, proto = sk->protocol;
	int ok = family == AF_UNIX || family == AF_NETLINK;

	if (family == AF_INET || family == AF_INET6)
		ok = (type == SOCK_STREAM && (proto == 0 || proto == IPPROTO_TCP)) ||
		     (type == SOCK_DGRAM && (proto == 0 || proto == IPPROTO_UDP));

	d.kind = TETHER_KIND_SOCKET;
	d.family = family;
	d.sock_type = type;
	d.proto = proto;
	void *rules = tether_begin(&d);
	if (rules) {
		if (ok) {
			d.verdict = TETHER_VERDICT_ALLOW;
			d.reason = TETHER_REASON_RULE;
		} else {
			tether_no_match(&d, rules, TETHER_REASON_SOCKET_TYPE);
		}
	}
	/* Creating a socket is not traffic; sample nothing but refusals. */
	tether_account(&d);
	if (d.verdict != TETHER_VERDICT_ALLOW) {
		struct tether_event *e = tether_event_reserve(&d);
		if (e) {
			e->sock_proto = proto;
			tether_submit(e);
		}
	}
	return d.verdict != TETHER_VERDICT_DENY;
}

SEC("cgroup/bind4")
int tether_bind4(struct bpf_sock_addr *ctx)
{
	struct tether_decision d = {};

	d.family = AF_INET;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	tether_addr4(d.addr, ctx->user_ip4);
	return tether_bind(&d);
}

SEC("cgroup/bind6")
int tether_bind6(struct bpf_sock_addr *ctx)
{
	struct tether_decision d = {};
	__u32 *addr = (__u32 *)d.addr;

	d.family = AF_INET6;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	return tether_bind(&d);
}

/* Every packet an agent socket sends, at the agent parents. Its cost in the common case is the
 * socket storage lookup, the agent's state and one compare. The common cases, with no decision
 * to build: a socket of a process in no agent (below an agent parent: a pod that is not an
 * agent, say) while no binding has changed; a plain packet of a socket of a live agent, one the
 * agent accepted or sends unconnected datagrams on (judged by sendmsg), or a TCP socket allowed
 * at the generation in force with no deadline. */

SEC("cgroup_skb/egress")
int tether_egress_skb(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1; /* a request or time-wait socket: a handshake reply or a final ACK */

	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, sk, 0, 0);
	if (s && (s->flags & TETHER_SOCK_DNS))
		tether_dns_peer_note(skb, sk, s);
	/* The common cases, with no decision to build (see above). */
	if (s && s->slot == TETHER_NO_SLOT && !(s->flags & TETHER_SOCK_OUTBOUND)) {
		__u32 zero = 0;
		struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
		if (cfg && s->born == cfg->bindings_gen)
			return 1;
	} else if (s && s->slot < TETHER_MAX_AGENTS && tether_plain(skb)) {
		__u32 slot = s->slot;
		struct tether_agent *ag = bpf_map_lookup_elem(&tether_agents, &slot);
		if (ag && ag->born == s->born && (ag->flags & (TETHER_AGENT_ACTIVE | TETHER_AGENT_KILLED)) == TETHER_AGENT_ACTIVE) {
			if (!(s->flags & TETHER_SOCK_OUTBOUND))
				return 1;
			__u32 active = ag->active & 1;
			int allowed = s->verdict == TETHER_VERDICT_ALLOW ||
				      (s->verdict == TETHER_VERDICT_AUDIT && (s->flags & TETHER_SOCK_REPORTED));
			if (sk->protocol == IPPROTO_TCP && (s->flags & TETHER_SOCK_CHECKED) && allowed && !s->deadline_ns &&
			    s->generation == ag->generation[active] && !ag->expires[active])
				return 1;
		}
	}

	struct tether_pkt p = {};
	struct tether_decision d = {};
	struct tether_agent *agent = NULL;
	int fresh = !s;
	if (s && !tether_sock_current(s, &agent))
		fresh = 1;
	tether_pkt_read(skb, &p);
	d.kind = TETHER_KIND_PACKET;
	d.proto = p.proto;
	d.dport = p.dport;
	d.family = sk->family;
	__builtin_memcpy(d.addr, p.daddr, 16);
	d.slot = TETHER_NO_SLOT;
	if (fresh) {
		__u32 slot = TETHER_NO_SLOT;
		if (!tether_skb_slot(skb, &d.cgroup_id, &slot))
			slot = TETHER_NO_SLOT;
		if (!s) {
			s = bpf_sk_storage_get(&tether_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (!s)
				tether_count(TETHER_COUNTER_SOCK_STORAGE_ERRORS);
		}
		agent = NULL;
		if (s) {
			tether_sock_attribute(s, slot, &agent);
			if (p.syn && slot != TETHER_NO_SLOT && !(s->flags & TETHER_SOCK_OUTBOUND)) {
				/* A connect no hook saw (made before the programs were attached). */
				s->flags |= TETHER_SOCK_OUTBOUND;
				s->pid = 0; /* not known here */
				s->start_ns = bpf_ktime_get_boot_ns();
			}
		} else if (slot != TETHER_NO_SLOT) {
			agent = bpf_map_lookup_elem(&tether_agents, &slot);
		}
		d.slot = slot;
	} else {
		d.slot = s->slot;
	}
	d.cgroup_id = d.cgroup_id ?: bpf_skb_cgroup_id(skb);

	if (d.slot == TETHER_NO_SLOT)
		return tether_skb_unattributed(skb, s, &p, &d);
	if (p.detour)
		return tether_skb_detour(skb, s, agent, &d);
	if (agent && (agent->flags & TETHER_AGENT_KILLED))
		return tether_skb_killed(skb, s, agent, &p, &d);
	return tether_skb_recheck(skb, sk, s, &p, &d);
}

/* Connections offered to an agent's listeners. A bind names its port and is checked by the bind
 * hooks; a listener that took an ephemeral port (listen on an unbound socket, a bind to port 0)
 * is not, and neither is one made before the programs were attached: a connection to a listener
 * of an agent whose listen rules do not name its port is dropped here, at its SYN (connections
 * over loopback excepted). Every other packet costs the socket's state. */
SEC("cgroup_skb/ingress")
int tether_ingress_skb(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->state != TETHER_TCP_LISTEN)
		return 1;

	struct tether_pkt p = {};
	struct tether_decision d = {};
	tether_pkt_read_dst(skb, &p);
	if (tether_loopback(p.daddr))
		return 1;
	d.kind = TETHER_KIND_BIND;
	d.family = sk->family;
	d.proto = IPPROTO_TCP;
	d.sock_type = SOCK_STREAM;
	d.dport = sk->src_port;
	__builtin_memcpy(d.addr, p.daddr, 16);
	__u32 slot = TETHER_NO_SLOT;
	if (!tether_skb_slot(skb, &d.cgroup_id, &slot))
		return 1; /* not an agent's listener */
	d.slot = slot;
	d.caller = TETHER_CALLER_NONE;
	void *rules = tether_begin_slot(&d, &slot);
	if (rules)
		tether_listen_rules(&d, rules);
	if (d.verdict == TETHER_VERDICT_ALLOW)
		return 1;
	/* One record per listener, not per SYN. */
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (s && s->slot == slot && (s->flags & TETHER_SOCK_REPORTED) && s->generation == d.generation) {
		tether_account(&d);
	} else {
		if (s) {
			s->slot = slot;
			s->born = d.born;
			s->generation = d.generation;
			s->flags = TETHER_SOCK_REPORTED;
		}
		tether_sock_event(&d, NULL, bpf_get_socket_uid(skb));
	}
	return d.verdict != TETHER_VERDICT_DENY;
}

#define TETHER_SOL_IP 0
#define TETHER_SOL_IPV6 41
#define TETHER_IP_OPTIONS 4
#define TETHER_IPV6_2292HOPOPTS 3
#define TETHER_IPV6_2292DSTOPTS 4
#define TETHER_IPV6_2292RTHDR 5
#define TETHER_IPV6_2292PKTOPTIONS 6
#define TETHER_IPV6_HOPOPTS 54
#define TETHER_IPV6_RTHDRDSTOPTS 55
#define TETHER_IPV6_RTHDR 57
#define TETHER_IPV6_DSTOPTS 59

/* Socket options that put IP options or IPv6 routing and option headers on every packet of a
 * socket are refused to agents (EPERM): a routing header sends a packet to its first segment, not
 * to the destination the connect hook allowed. The egress program drops such packets whatever
 * set them (ancillary data per message too); this says no at the source and says why. */
SEC("cgroup/setsockopt")
int tether_setsockopt(struct bpf_sockopt *ctx)
{
	int level = ctx->level, name = ctx->optname;
	int detour = (level == TETHER_SOL_IP && name == TETHER_IP_OPTIONS) ||
		     (level == TETHER_SOL_IPV6 &&
		      (name == TETHER_IPV6_RTHDR || name == TETHER_IPV6_2292RTHDR || name == TETHER_IPV6_HOPOPTS ||
		       name == TETHER_IPV6_2292HOPOPTS || name == TETHER_IPV6_DSTOPTS || name == TETHER_IPV6_2292DSTOPTS ||
		       name == TETHER_IPV6_RTHDRDSTOPTS || name == TETHER_IPV6_2292PKTOPTIONS));
	if (ctx->optlen > 4096)
		ctx->optlen = 0; /* the program sees only a page: the kernel takes the caller's buffer */
	if (!detour)
		return 1;

	struct tether_decision d = {};
	d.kind = TETHER_KIND_SOCKOPT;
	d.family = level == TETHER_SOL_IP ? AF_INET : AF_INET6;
	d.dport = name;
	void *rules = tether_begin(&d);
	if (d.slot == TETHER_NO_SLOT && d.reason != TETHER_REASON_DEPTH)
		return 1; /* not an agent: the unknown-cgroup verdict is for traffic */
	d.verdict = TETHER_VERDICT_DENY;
	d.reason = d.slot == TETHER_NO_SLOT ? TETHER_REASON_DEPTH : TETHER_REASON_DETOUR;
	if (rules) {
		struct tether_rule_value *h = tether_header(rules);
		if (h && h->mode == TETHER_MODE_AUDIT)
			d.verdict = TETHER_VERDICT_AUDIT;
	}
	tether_account(&d);
	struct tether_event *e = tether_event_reserve(&d);
	if (e)
		tether_submit(e);
	return d.verdict != TETHER_VERDICT_DENY;
}

SEC("iter/tcp")
int tether_sweep_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* a request or time-wait socket: nothing to send */
	return tether_sweep_sock((struct sock *)tp, skc, IPPROTO_TCP, ctx->uid);
}

SEC("iter/udp")
int tether_sweep_udp(struct bpf_iter__udp *ctx)
{
	struct udp_sock *us = ctx->udp_sk;
	if (!us)
		return 0;
	return tether_sweep_sock((struct sock *)us, (struct sock_common *)us, IPPROTO_UDP, ctx->uid);
}

/* Runs after every successful exec on the host, before the new image runs user code. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(tether_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct tether_decision d = {};
	void *rules = NULL;
	__u32 tgid = BPF_CORE_READ(task, tgid);

	/* Not below any agent parent: nothing to decide (one helper call per parent), unless it is
	 * an agent process that left (a move the migration program could not stop). */
	int under = tether_under_parent();
	if (under)
		tether_exec_decide(&d, bprm, &rules);
	int agent_exec = under && (d.slot != TETHER_NO_SLOT || d.reason == TETHER_REASON_DEPTH);
	if (!agent_exec || d.slot != TETHER_NO_SLOT) {
		/* Its lineage says which agent it belongs to; found elsewhere, it was moved out. */
		struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
		struct tether_agent *agent = p ? tether_live_agent(p) : NULL;
		if (agent && (!agent_exec || p->slot != d.slot)) {
			tether_migrated(task, p, agent, under ? d.cgroup_id : bpf_get_current_cgroup_id(), NULL, 1);
			return 0;
		}
	}
	if (!agent_exec)
		return 0; /* not an agent: never touched */
	if (d.slot != TETHER_NO_SLOT && tether_exec_lineage(task, d.slot, bprm, &d) && d.verdict != TETHER_VERDICT_DENY) {
		/* No room to record what it runs: killed in either exec mode, not run untracked (the
		 * LSM program allowed it before the lineage was known to be full). */
		d.reason = TETHER_REASON_LINEAGE_FULL;
		d.verdict = TETHER_VERDICT_DENY;
		struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
		if (h && h->mode == TETHER_MODE_AUDIT)
			d.verdict = TETHER_VERDICT_AUDIT;
		if (!tether_exec_signal) {
			if (d.verdict == TETHER_VERDICT_DENY && bpf_send_signal(SIGKILL))
				tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
			tether_exec_event(&d, rules, bprm);
			return 0;
		}
	}
	if (tether_unresolved_root(&d)) {
		/* Held, in either exec mode (the LSM program let it through): tetherd resolves the
		 * container's root, then continues or kills it. An audit agent is not held. */
		if (d.verdict == TETHER_VERDICT_DENY && bpf_send_signal(SIGSTOP))
			tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
		tether_exec_event(&d, rules, bprm);
		return 0;
	}
	if (!tether_exec_signal)
		return 0; /* the LSM program decides and reports */

	if (d.verdict == TETHER_VERDICT_DENY && bpf_send_signal(SIGKILL))
		tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
	tether_exec_event(&d, rules, bprm);
	return 0;
}

/* Where BPF LSM is active: refuse the exec itself, so the caller gets EPERM. */
SEC("lsm/bprm_check_security")
int BPF_PROG(tether_exec_lsm, struct linux_binprm *bprm, int ret)
{
	struct tether_decision d = {};
	void *rules = NULL;

	if (ret)
		return ret;
	if (!tether_under_parent())
		return 0;
	tether_exec_decide(&d, bprm, &rules);
	if (d.slot == TETHER_NO_SLOT && d.reason != TETHER_REASON_DEPTH)
		return 0;
	if (tether_unresolved_root(&d))
		return 0; /* the tracepoint holds it and reports */
	tether_exec_event(&d, rules, bprm);
	return d.verdict == TETHER_VERDICT_DENY ? -EPERM : 0;
}

/* Every move of a process to another cgroup (a write to cgroup.procs or cgroup.threads), after it
 * is done and before the moved task runs user code again. An agent process that leaves its
 * agent's subtree is killed (tetherd's own moves excepted): outside it no program judges it. A
 * process that is not an agent's costs one lookup. */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(tether_migrate, struct cgroup *dst, const char *path, struct task_struct *task, bool threadgroup)
{
	__u32 tgid = BPF_CORE_READ(task, tgid), zero = 0;
	struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
	if (!p)
		return 0;
	struct tether_agent *agent = tether_live_agent(p);
	if (!agent)
		return 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (cfg && cfg->daemon_tgid && cfg->daemon_tgid == bpf_get_current_pid_tgid() >> 32)
		return 0;
	if (tether_cgroup_in_slot(dst, p->slot))
		return 0;
	tether_migrated(task, p, agent, BPF_CORE_READ(dst, kn, id), path, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(tether_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 pid = BPF_CORE_READ(child, pid), tgid = BPF_CORE_READ(child, tgid);
	__u32 ptgid = BPF_CORE_READ(parent, tgid);

	if (pid != tgid)
		return 0; /* a new thread, not a new process */
	struct tether_proc *pp = bpf_map_lookup_elem(&tether_procs, &ptgid);
	if (!pp)
		return 0; /* the parent is not an agent process */
	struct tether_proc p = *pp;
	p.ppid = ptgid;
	p.start_ns = bpf_ktime_get_boot_ns();
	if (bpf_map_update_elem(&tether_procs, &tgid, &p, BPF_ANY)) {
		tether_count(TETHER_COUNTER_LINEAGE_UPDATE_ERRORS);
		/* No room for its lineage: where the kernel lets a program signal another task (6.13+),
		 * the child is killed before it runs; elsewhere it runs untracked until its exec (killed
		 * then) and its unix path connects are denied. */
		if (bpf_ksym_exists(bpf_send_signal_task) && bpf_send_signal_task(child, SIGKILL, PIDTYPE_TGID, 0))
			tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
	}
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(tether_exit, struct task_struct *task)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);

	if (BPF_CORE_READ(task, signal, live.counter) != 0)
		return 0; /* other threads of the process still run */
	/* Every process of the host ends here: look (lock-free) before deleting (locked). */
	if (bpf_map_lookup_elem(&tether_procs, &tgid))
		bpf_map_delete_elem(&tether_procs, &tgid);
	return 0;
}

/* Agents create inet, inet6 and unix sockets and route netlink sockets; any other family
 * (AF_VSOCK, AF_PACKET, AF_ALG, ...) is refused. */
SEC("lsm/socket_create")
int BPF_PROG(tether_socket_lsm, int family, int type, int protocol, int kern, int ret)
{
	struct tether_decision d = {};

	if (ret || kern)
		return ret;
	if (family == AF_INET || family == AF_INET6 || family == AF_UNIX || (family == AF_NETLINK && protocol == NETLINK_ROUTE))
		return 0;
	if (!tether_guard_decide(&d, TETHER_KIND_SOCKET, TETHER_REASON_FAMILY))
		return 0;
	d.family = family;
	d.sock_type = type;
	d.proto = protocol;
	return tether_guard_finish(&d, NULL);
}

/* No user namespace for agents: inside one, an agent is root over new mount namespaces. */
SEC("lsm/userns_create")
int BPF_PROG(tether_userns_lsm, const struct cred *cred, int ret)
{
	struct tether_decision d = {};

	if (ret)
		return ret;
	if (!tether_guard_decide(&d, TETHER_KIND_GUARD, TETHER_REASON_USERNS))
		return 0;
	return tether_guard_finish(&d, "userns");
}

/* No bpf() for agents: pinned maps and links are tether's enforcement. The hook's arguments differ
 * between kernels; only the command is read. */
SEC("lsm/bpf")
int BPF_PROG(tether_bpf_lsm, int cmd)
{
	struct tether_decision d = {};

	if (!tether_guard_decide(&d, TETHER_KIND_GUARD, TETHER_REASON_BPF))
		return 0;
	d.dport = cmd;
	return tether_guard_finish(&d, "bpf");
}

/* An agent may trace (ptrace, /proc/<pid>/mem, process_vm_readv, pidfd_getfd) only processes of
 * its own agent. */
SEC("lsm/ptrace_access_check")
int BPF_PROG(tether_ptrace_lsm, struct task_struct *child, unsigned int mode, int ret)
{
	struct tether_decision d = {};
	__u32 slot = TETHER_NO_SLOT;

	if (ret)
		return ret;
	if (!tether_guard_decide(&d, TETHER_KIND_GUARD, TETHER_REASON_PTRACE))
		return 0;
	if (d.slot != TETHER_NO_SLOT && tether_cgroup_slot(BPF_CORE_READ(child, cgroups, dfl_cgrp), &slot, TETHER_MAX_ANCESTORS + 1) &&
	    slot == d.slot)
		return 0;
	return tether_guard_finish(&d, (const char *)child->comm);
}

/* An agent may move processes only within its own agent: opening another cgroup's cgroup.procs or
 * cgroup.threads for writing is refused (tp_btf/cgroup_attach_task kills what gets through, on
 * every kernel). */
SEC("lsm/file_open")
int BPF_PROG(tether_cgroup_open_lsm, struct file *file, int ret)
{
	struct tether_decision d = {};
	char name[16] = {};

	if (ret)
		return ret;
	if (!(BPF_CORE_READ(file, f_mode) & FMODE_WRITE))
		return 0;
	if (BPF_CORE_READ(file, f_inode, i_sb, s_magic) != TETHER_CGROUP2_MAGIC)
		return 0;
	struct dentry *dentry = BPF_CORE_READ(file, f_path.dentry);
	bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(dentry, d_name.name));
	/* "cgroup.procs" or "cgroup.threads", byte by byte (BPF has no memcmp). */
	const char procs[] = "cgroup.procs", threads[] = "cgroup.threads";
	int is_procs = 1, is_threads = 1;
	for (int i = 0; i < 15; i++) {
		if (i < 13 && name[i] != procs[i])
			is_procs = 0;
		if (name[i] != threads[i])
			is_threads = 0;
	}
	if (!is_procs && !is_threads)
		return 0;
	if (!tether_guard_decide(&d, TETHER_KIND_MIGRATE, TETHER_REASON_MIGRATION))
		return 0;
	if (d.slot != TETHER_NO_SLOT) {
		/* As far up as tether_cgroup_in_slot looks: a move deep below its own agent is no
		 * migration (the depth guard judges what runs there). */
		struct dentry *dir = BPF_CORE_READ(dentry, d_parent);
		for (int i = 0; i < 64; i++) {
			if (!dir)
				break;
			__u64 id = BPF_CORE_READ(dir, d_inode, i_ino);
			struct tether_binding *b = bpf_map_lookup_elem(&tether_cgroups, &id);
			if (b) {
				if (b->slot == d.slot)
					return 0; /* within its own agent */
				break;
			}
			struct dentry *up = BPF_CORE_READ(dir, d_parent);
			if (up == dir)
				break;
			dir = up;
		}
	}
	/* The record names the cgroup it would have moved into, as the migration program does (its
	 * id; its directory's name, not the whole path). */
	struct dentry *into = BPF_CORE_READ(dentry, d_parent);
	d.cgroup_id = BPF_CORE_READ(into, d_inode, i_ino);
	return tether_guard_finish(&d, (const char *)BPF_CORE_READ(into, d_name.name));
}

/* The stream hook passes the socks (the listener found by the path), the datagram one the
 * sockets. */
SEC("lsm/unix_stream_connect")
int BPF_PROG(tether_unix_stream_lsm, struct sock *sock, struct sock *other, struct sock *newsk, int ret)
{
	if (ret)
		return ret;
	return tether_unix_peer(other, TETHER_KIND_CONNECT_UNIX, BPF_CORE_READ(sock, sk_type));
}

SEC("lsm/unix_may_send")
int BPF_PROG(tether_unix_send_lsm, struct socket *sock, struct socket *other, int ret)
{
	if (ret)
		return ret;
	return tether_unix_peer(BPF_CORE_READ(other, sk), TETHER_KIND_SENDMSG_UNIX, BPF_CORE_READ(sock, type));
}
