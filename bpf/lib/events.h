/* Accounting, sampling and the decision records handed to the daemon. */

#ifndef TETHER_LIB_EVENTS_H
#define TETHER_LIB_EVENTS_H

static __always_inline void tether_account(struct tether_decision *d)
{
	if (d->slot == TETHER_NO_SLOT) {
		tether_count(TETHER_COUNTER_UNKNOWN_CGROUP);
		return;
	}
	__u32 slot = d->slot; /* keys on the stack: 6.1 takes no other memory as one */
	if (d->verdict == TETHER_VERDICT_ALLOW && d->kind <= TETHER_KIND_SENDMSG6) {
		struct tether_agent_allows *a = bpf_map_lookup_elem(&tether_agent_allows, &slot);
		if (a)
			a->n[d->kind & 3] += 1;
		return;
	}
	struct tether_agent_counts *c = bpf_map_lookup_elem(&tether_agent_counters, &slot);
	__u32 i = (__u32)d->kind * TETHER_VERDICT_MAX + d->verdict;
	if (c && i < TETHER_KIND_MAX * TETHER_VERDICT_MAX)
		__sync_fetch_and_add(&c->n[i], 1);
}

/* tether_should_emit says whether d gets an event: every deny and audit, and one allow in
 * tether_allow_sample on average. A per-CPU countdown decides, so that an allow that is not
 * sampled costs no helper call and no division; each new countdown is random (1 to 2N-1 allows),
 * so that an agent cannot time its connects between samples. */
static __always_inline int tether_should_emit(struct tether_decision *d)
{
	if (d->verdict != TETHER_VERDICT_ALLOW)
		return 1;
	if (!tether_allow_sample)
		return 0;
	__u32 zero = 0;
	struct tether_slot_cache_entry *c = bpf_map_lookup_elem(&tether_slot_cache, &zero);
	if (!c)
		return 0;
	__u32 left = c->sample_left;
	if (left > 1) {
		c->sample_left = left - 1;
		return 0;
	}
	c->sample_left = 1 + bpf_get_prandom_u32() % (2 * tether_allow_sample - 1);
	return 1;
}

/* tether_event_lineage fills in the binary of process e->pid and its parents, from lineage, and
 * returns its lineage entry (NULL: none); with bin, the binary is also the event's (the calling
 * one). The key lives on the stack: older kernels (6.1) refuse ring buffer memory as a map key. */
static __always_inline struct tether_proc *tether_event_lineage(struct tether_event *e, int bin)
{
	__u32 tgid = e->pid;
	struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
	if (!p)
		return NULL;
	if (bin) {
		e->bin_dev = p->bin_dev;
		e->bin_ino = p->bin_ino;
	}
	__builtin_memcpy(e->binary, p->path, sizeof(e->binary));
	__u32 ppid = p->ppid;
	for (int i = 0; i < TETHER_CHAIN_LEN; i++) {
		struct tether_proc *pp = bpf_map_lookup_elem(&tether_procs, &ppid);
		if (!pp)
			break;
		e->chain[i].pid = ppid;
		e->chain[i].bin_dev = pp->bin_dev;
		e->chain[i].bin_ino = pp->bin_ino;
		__builtin_memcpy(e->chain[i].comm, pp->comm, sizeof(pp->comm));
		e->chain_len = i + 1;
		ppid = pp->ppid;
	}
	return p;
}

/* tether_event_reserve returns a zeroed event filled from d and the current task, or NULL (counted)
 * when the ring buffer is full. */
static __always_inline struct tether_event *tether_event_reserve(struct tether_decision *d)
{
	struct tether_event *e = bpf_ringbuf_reserve(&tether_events, sizeof(*e), 0);
	if (!e) {
		tether_count(TETHER_COUNTER_RINGBUF_DROPS);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));

	__u64 pid_tgid = bpf_get_current_pid_tgid();
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->generation = d->generation;
	e->cgroup_id = d->cgroup_id;
	e->slot = d->slot;
	e->pid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->kind = d->kind;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->proto = d->proto;
	e->dport = d->dport;
	e->family = d->family;
	e->sock_type = d->sock_type;
	e->bin_dev = d->bin_dev;
	e->bin_ino = d->bin_ino;
	__builtin_memcpy(e->daddr, d->addr, sizeof(e->daddr));
	bpf_get_current_comm(e->comm, sizeof(e->comm));

	tether_event_lineage(e, d->kind != TETHER_KIND_EXEC);
	return e;
}

/* tether_finish accounts the decision, emits its event when due and returns the hook's answer
 * (1 allow, 0 deny) for cgroup programs. */
static __always_inline int tether_finish(struct tether_decision *d, void *rules)
{
	tether_account(d);
	if (tether_should_emit(d)) {
		if (d->generation == 0 && rules) {
			struct tether_rule_value *h = tether_header(rules);
			if (h)
				d->generation = h->generation;
		}
		struct tether_event *e = tether_event_reserve(d);
		if (e)
			tether_submit(e);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

#endif /* TETHER_LIB_EVENTS_H */
