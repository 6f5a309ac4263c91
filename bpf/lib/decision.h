/* What one hook invocation decided, and the counters. */

#ifndef TETHER_LIB_DECISION_H
#define TETHER_LIB_DECISION_H

/* What one hook invocation decided, carried to accounting and the event. */
struct tether_decision {
	__u8 addr[16];
	__u64 cgroup_id;
	__u64 generation;
	__u64 host_floor; /* floor of the buffer in force (see struct tether_agent) */
	__u8 bulk;	  /* bulk and trie_max of the buffer in force */
	__u8 trie_max;
	__u32 buf;	  /* the buffer in force: slot * 2 + active */
	__u32 slot;
	__u8 kind;
	__u8 verdict;
	__u8 reason;
	__u8 proto;
	__u16 dport;
	__u16 family;
	__u32 sock_type;
	__u32 bin_dev;
	__u64 bin_ino;
	/* The calling binary, for rules restricted to one: TETHER_CALLER_CURRENT looks up the
	 * current process's lineage when a rule asks; a sweep or a packet gives the binary that
	 * connected the socket (TETHER_CALLER_KNOWN) or none (TETHER_CALLER_NONE). */
	__u8 caller;
	/* A check of a live socket, not a new connect: counted grants take no use. */
	__u8 recheck;
	/* TETHER_DNS_REDIRECT: DNS that goes to the proxy (allowed); TETHER_DNS_DENY_DOT: DNS over
	 * TLS, denied. */
	__u8 dns;
	__u32 caller_dev;
	__u64 caller_ino;
	__u32 max_ms;	 /* max_duration of the rule that allowed (0: none) */
	__u32 grant;	 /* the counted grant the rule that allowed holds by (0: none) */
	__u64 born;	 /* tether_agents[slot].born */
};

enum tether_caller {
	TETHER_CALLER_CURRENT = 0,
	TETHER_CALLER_KNOWN = 1,
	TETHER_CALLER_NONE = 2,
};

static __always_inline void tether_count(__u32 counter)
{
	__u64 *v = bpf_map_lookup_elem(&tether_counters, &counter);
	if (v)
		*v += 1;
}

/* tether_submit hands a reserved record to the daemon and counts it. */
static __always_inline void tether_submit(struct tether_event *e)
{
	bpf_ringbuf_submit(e, 0);
	tether_count(TETHER_COUNTER_EVENTS_SUBMITTED);
}

#endif /* TETHER_LIB_DECISION_H */
