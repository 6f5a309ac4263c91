/* Which agent a task belongs to, and the state and rule set of that agent. */

#ifndef TETHER_LIB_ATTRIBUTION_H
#define TETHER_LIB_ATTRIBUTION_H

/* tether_walk_slot binds the task to an agent: its own cgroup, else the nearest of
 * TETHER_MAX_ANCESTORS ancestors that is bound. Returns 0 when the task is in no agent. */
static __always_inline int tether_walk_slot(__u64 id, __u32 *slot)
{
	struct tether_binding *b = bpf_map_lookup_elem(&tether_cgroups, &id);
	if (b) {
		*slot = b->slot;
		return 1;
	}

	struct task_struct *task = bpf_get_current_task_btf();
	int level = BPF_CORE_READ(task, cgroups, dfl_cgrp, level);
	for (int i = 1; i <= TETHER_MAX_ANCESTORS; i++) {
		int l = level - i;
		if (l < 0)
			break;
		__u64 ancestor = bpf_get_current_ancestor_cgroup_id(l);
		b = bpf_map_lookup_elem(&tether_cgroups, &ancestor);
		if (b) {
			*slot = b->slot;
			return 1;
		}
	}
	return 0;
}

/* tether_find_slot is tether_walk_slot behind a per-CPU cache of the last answer, valid while the
 * daemon has not changed any binding since (see struct tether_slot_cache_entry). It saves the hash
 * lookup (and the ancestor walk of nested cgroups) on the hot path of a process that connects again
 * and again. */
static __always_inline int tether_find_slot(__u64 *cgroup_id, __u32 *slot)
{
	__u64 id = bpf_get_current_cgroup_id();
	__u32 zero = 0;
	*cgroup_id = id;

	struct tether_slot_cache_entry *c = bpf_map_lookup_elem(&tether_slot_cache, &zero);
	if (!c)
		return tether_walk_slot(id, slot);
	/* Read before the walk: a change racing it leaves an entry of the old generation. */
	__u64 gen = *(volatile __u32 *)&c->bindings_gen;
	__u64 cid = c->cgroup_id, packed = c->packed, check = c->check;
	if (cid == id && packed >> 32 == gen && check == (cid ^ packed ^ TETHER_CACHE_MAGIC)) {
		*slot = (packed >> 1) & 0x7fffffff;
		return packed & 1;
	}

	__u32 s = 0;
	int found = tether_walk_slot(id, &s);
	packed = gen << 32 | (__u64)s << 1 | (found ? 1 : 0);
	c->cgroup_id = id;
	c->packed = packed;
	c->check = id ^ packed ^ TETHER_CACHE_MAGIC;
	*slot = s;
	return found;
}

/* tether_under_parent says whether the current task is below an agent parent: one helper call
 * per parent (usually one), no walk. */
static __always_inline int tether_under_parent(void)
{
	__u32 zero = 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (!cfg)
		return 0;
	__u32 n = cfg->parents;
	for (__u32 i = 0; i < TETHER_MAX_PARENTS; i++) {
		if (i >= n)
			break;
		if (bpf_current_task_under_cgroup(&tether_parents, i) == 1)
			return 1;
	}
	return 0;
}

/* tether_too_deep says, for a task below an agent parent whose walk found no agent, whether the
 * walk could have missed one: its cgroup is more than TETHER_MAX_ANCESTORS levels below the
 * agent cgroups' level (one below the shallowest parent). Such a task is denied everything. */
static __always_inline int tether_too_deep(void)
{
	__u32 zero = 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (!cfg || !cfg->parents)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	int level = BPF_CORE_READ(task, cgroups, dfl_cgrp, level);
	return level > (int)cfg->parent_level + 1 + TETHER_MAX_ANCESTORS;
}

static __always_inline struct tether_rule_value *tether_header(void *rules)
{
	struct tether_rule_key key = {};

	key.prefixlen = 8;
	key.kind = TETHER_RULE_HEADER;
	return bpf_map_lookup_elem(rules, &key);
}

/* tether_expired says whether buffer active of agent (d->slot's) has passed its expiry, and if
 * so sets d's verdict: a deny, or a would-deny when the rule set is in audit mode. The clock is
 * read only for a buffer that expires. */
static __always_inline int tether_expired(struct tether_decision *d, struct tether_agent *agent, __u32 active)
{
	__u64 expires = agent->expires[active];
	if (!expires || bpf_ktime_get_boot_ns() < expires)
		return 0;
	d->reason = TETHER_REASON_EXPIRED;
	d->verdict = TETHER_VERDICT_DENY;
	__u32 buf = d->slot * 2 + active;
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
	if (h && h->mode == TETHER_MODE_AUDIT)
		d->verdict = TETHER_VERDICT_AUDIT;
	return 1;
}

/* tether_agent_state reads the state of the agent in d->slot (*slot_key: a copy on the stack where
 * d is not, since 6.1 takes no other memory as a map key) into d: 1 when it is active, with its
 * buffer in d->buf; else 0 after it has set d->verdict (killed, nothing installed, expired). */
static __always_inline int tether_agent_state(struct tether_decision *d, __u32 *slot_key)
{
	struct tether_agent *agent = bpf_map_lookup_elem(&tether_agents, slot_key);
	if (!agent) {
		d->reason = TETHER_REASON_NO_RULESET;
		d->verdict = TETHER_VERDICT_DENY;
		return 0;
	}
	/* One read of each: the daemon rewrites this value as a whole. What concerns a buffer
	 * (generation, floor, bulk, trie_max) it writes before the write that puts the buffer in
	 * force, so the fields of the buffer read as active belong together. */
	__u32 flags = agent->flags, active = agent->active & 1;
	d->born = agent->born;
	d->generation = agent->generation[active];
	if (flags & TETHER_AGENT_KILLED) {
		d->reason = TETHER_REASON_KILLED;
		d->verdict = TETHER_VERDICT_DENY;
		return 0;
	}
	d->buf = d->slot * 2 + active;
	d->host_floor = agent->floor[active];
	d->bulk = agent->bulk[active];
	d->trie_max = agent->trie_max[active];
	if (!(flags & TETHER_AGENT_ACTIVE)) {
		d->reason = TETHER_REASON_NO_RULESET;
		d->verdict = TETHER_VERDICT_DENY;
		return 0;
	}
	return !tether_expired(d, agent, active);
}

/* tether_ruleset returns the rule set in d->buf, or NULL after it has set d->verdict. */
static __always_inline void *tether_ruleset(struct tether_decision *d)
{
	__u32 buf = d->buf;
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	if (!rules) {
		d->reason = TETHER_REASON_NO_RULESET;
		d->verdict = TETHER_VERDICT_DENY;
	}
	return rules;
}

/* tether_begin_slot resolves the rule set of the agent in d->slot: as tether_agent_state, then
 * tether_ruleset. */
static __always_inline void *tether_begin_slot(struct tether_decision *d, __u32 *slot_key)
{
	if (!tether_agent_state(d, slot_key))
		return NULL;
	return tether_ruleset(d);
}

/* tether_begin_agent resolves the current task's agent: as tether_agent_state, and for a task in
 * no agent 0 with the unknown-cgroup verdict, or a deny for depth when the walk may have missed
 * its agent (see tether_too_deep). */
static __always_inline int tether_begin_agent(struct tether_decision *d)
{
	if (!tether_find_slot(&d->cgroup_id, &d->slot)) {
		d->slot = TETHER_NO_SLOT;
		d->reason = TETHER_REASON_UNKNOWN_CGROUP;
		d->verdict = tether_unknown_cgroup_allow ? TETHER_VERDICT_ALLOW : TETHER_VERDICT_DENY;
		if (tether_too_deep()) {
			d->reason = TETHER_REASON_DEPTH;
			d->verdict = TETHER_VERDICT_DENY;
		}
		return 0;
	}
	return tether_agent_state(d, &d->slot);
}

/* tether_begin resolves the current task's agent and its rule set: tether_begin_agent, then
 * tether_ruleset. */
static __always_inline void *tether_begin(struct tether_decision *d)
{
	if (!tether_begin_agent(d))
		return NULL;
	return tether_ruleset(d);
}

#endif /* TETHER_LIB_ATTRIBUTION_H */
