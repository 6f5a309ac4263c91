/* The sweep of live sockets from the socket iterators. */

#ifndef TETHER_LIB_SWEEP_H
#define TETHER_LIB_SWEEP_H

/* tether_cgroup_slot finds the agent of cgroup cg: the nearest of cg and its ancestors, levels at
 * most, that is bound (tether_walk_slot does the same for the current task with helpers). */
static __always_inline int tether_cgroup_slot(struct cgroup *cg, __u32 *slot, const int levels)
{
	for (int i = 0; i < levels; i++) {
		if (!cg)
			break;
		__u64 id = BPF_CORE_READ(cg, kn, id);
		struct tether_binding *b = bpf_map_lookup_elem(&tether_cgroups, &id);
		if (b) {
			*slot = b->slot;
			return 1;
		}
		cg = (struct cgroup *)BPF_CORE_READ(cg, self.parent);
	}
	return 0;
}

/* tether_sk_slot finds the agent of a socket from its cgroup, as tether_walk_slot does for a task:
 * the socket's cgroup or the nearest of TETHER_MAX_ANCESTORS ancestors that is bound. */
static __always_inline int tether_sk_slot(struct sock *sk, __u64 *cgroup_id, __u32 *slot)
{
	struct cgroup *cg = sk->sk_cgrp_data.cgroup;

	if (cg)
		*cgroup_id = BPF_CORE_READ(cg, kn, id);
	return tether_cgroup_slot(cg, slot, TETHER_MAX_ANCESTORS + 1);
}

/* tether_sweep_sock checks one live socket in a sweep of the slots tether_sweep names: a killed
 * agent's sockets are all terminated; a socket the agent connected is terminated when the rule
 * set in force no longer allows its destination, or its rule's max_duration has passed. In audit
 * mode the would-be termination is recorded instead. */
static __always_inline int tether_sweep_sock(struct sock *sk, struct sock_common *skc, __u8 proto, __u32 uid)
{
	__u16 family = sk->__sk_common.skc_family;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	__u32 zero = 0, all = TETHER_SWEEP_ALL;
	struct tether_sweep_slot *a = bpf_map_lookup_elem(&tether_sweep, &all);
	__u32 *shard = bpf_map_lookup_elem(&tether_sweep_shard, &zero);
	if (!a)
		return 0;
	if (shard && *shard && a->checked > 1 && bpf_get_socket_cookie(sk) % a->checked != *shard - 1)
		return 0; /* another reader's */
	struct tether_decision d = {};
	struct tether_agent *agent = NULL;
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, sk, 0, 0);
	d.slot = TETHER_NO_SLOT;
	if (s && tether_sock_current(s, &agent)) {
		d.slot = s->slot;
	} else {
		if (!s && !a->want)
			return 0;
		__u32 slot = TETHER_NO_SLOT;
		if (!tether_sk_slot(sk, &d.cgroup_id, &slot))
			return 0;
		d.slot = slot;
		if (s)
			tether_sock_attribute(s, slot, &agent);
		else
			agent = bpf_map_lookup_elem(&tether_agents, &slot);
	}
	struct tether_sweep_slot *sw = bpf_map_lookup_elem(&tether_sweep, &d.slot);
	if (!sw || !sw->want || !agent)
		return 0;
	__sync_fetch_and_add(&sw->checked, 1);
	if (!d.cgroup_id)
		d.cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);

	d.kind = TETHER_KIND_TERMINATE;
	d.family = family;
	d.proto = proto;
	d.dport = bpf_ntohs(sk->__sk_common.skc_dport);
	if (family == AF_INET)
		tether_addr4(d.addr, sk->__sk_common.skc_daddr);
	else
		BPF_CORE_READ_INTO(&d.addr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	int state = sk->__sk_common.skc_state;

	if (agent->flags & TETHER_AGENT_KILLED) {
		d.verdict = TETHER_VERDICT_DENY;
		d.reason = TETHER_REASON_KILLED;
		d.generation = agent->generation[agent->active & 1];
	} else {
		int connected = proto == IPPROTO_TCP ? state != TCP_LISTEN && state != TCP_CLOSE : d.dport != 0;
		if (!s || !(s->flags & TETHER_SOCK_OUTBOUND) || !connected)
			return 0;
		int fresh = tether_sock_check(&d, s);
		if (d.verdict == TETHER_VERDICT_ALLOW || (d.verdict == TETHER_VERDICT_AUDIT && !fresh))
			return 0;
	}
	if (d.verdict == TETHER_VERDICT_DENY) {
		/* skc, not sk: the iterator's own pointer is the one the verifier trusts. */
		if (bpf_sock_destroy(skc)) {
			__sync_fetch_and_add(&sw->errors, 1);
			tether_count(TETHER_COUNTER_DESTROY_ERRORS);
		} else {
			__sync_fetch_and_add(&sw->destroyed, 1);
		}
	}
	if (s)
		s->flags |= TETHER_SOCK_REPORTED;
	tether_sock_event(&d, s, uid);
	return 0;
}

#endif /* TETHER_LIB_SWEEP_H */
