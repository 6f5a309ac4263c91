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

#define AF_UNIX 1
#define AF_INET 2
#define AF_INET6 10
#define AF_NETLINK 16
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define SIGKILL 9
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct tether_binding);
} tether_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent);
} tether_agents SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tether_config_entry);
} tether_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tether_slot_cache_entry);
} tether_slot_cache SEC(".maps");

#define TETHER_CACHE_MAGIC 0x7e7e3a5b1d2c4f60ULL

struct tether_rules {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TETHER_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tether_rule_key);
	__type(value, struct tether_rule_value);
};

/* Types that Go needs but no map or program signature names (the inner map's key and value, the
 * event, the enums): this pointer keeps them whole in BTF for bpf2go -type. Nothing reads it. */
struct tether_btf_anchor {
	struct tether_rule_key rule_key;
	struct tether_rule_value rule_value;
	struct tether_host_key host_key;
	struct tether_host_value host_value;
	struct tether_event event;
	enum tether_limits limits;
	enum tether_rule_kind rule_kind;
	enum tether_kind kind;
	enum tether_verdict verdict;
	enum tether_reason reason;
	enum tether_mode mode;
	enum tether_agent_flags agent_flags;
	enum tether_port_rule_flags port_rule_flags;
	enum tether_counter counter;
	enum tether_sock_flags sock_flags;
	struct tether_config_entry config;
	struct tether_slot_cache_entry slot_cache;
};
const struct tether_btf_anchor *const tether_btf_anchor __attribute__((unused)) = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, TETHER_RULESET_ENTRIES);
	__type(key, __u32);
	__array(values, struct tether_rules);
} tether_rulesets SEC(".maps");

/* Preallocated: an update takes a free element instead of allocating one (three times faster). A
 * freed element may be reused at once, so the daemon deletes or overwrites only entries of a
 * buffer that no hook can be reading (not in force, its grace period over). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_HOST_RULES);
	__type(key, struct tether_host_key);
	__type(value, struct tether_host_value);
} tether_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_PROCS);
	__type(key, __u32);
	__type(value, struct tether_proc);
} tether_procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* the daemon sets the size from its config */
} tether_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TETHER_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tether_counters SEC(".maps");

/* tether_settled[0]: records of tether_events that daemons have settled (written to their sinks,
 * or counted lost) since the pins were made. Only the daemon writes it: what a daemon read and
 * had not settled when it was killed is the difference to TETHER_COUNTER_EVENTS_SUBMITTED less
 * what the ring buffer still holds, which the next daemon counts lost. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tether_settled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_counts);
} tether_agent_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_allows);
} tether_agent_allows SEC(".maps");

/* Counted grants, by the index the daemon gives them; see struct tether_grant_uses. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_GRANTS);
	__type(key, __u32);
	__type(value, struct tether_grant_uses);
} tether_grant_uses SEC(".maps");

/* Written and read by the daemon only; see struct tether_agent_info. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_info);
} tether_agent_info SEC(".maps");

/* What the programs know of each socket of an agent (see struct tether_sock). Not cloned: a
 * socket an agent accepts starts without one, and is not judged by the egress rules. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tether_sock);
} tether_socks SEC(".maps");

/* The slots a sweep of live sockets checks; see struct tether_sweep_slot. The entry after the
 * last slot describes the sweep: want says whether it also looks at sockets that have no storage
 * (it has a killed agent, whose listeners go too: that costs a walk of each such socket's
 * cgroups), checked in how many shards it runs (see tether_sweep_shard). */
#define TETHER_SWEEP_ALL TETHER_MAX_AGENTS
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS + 1);
	__type(key, __u32);
	__type(value, struct tether_sweep_slot);
} tether_sweep SEC(".maps");

/* The shard of a sweep this CPU's reader takes (index + 1; 0: every socket). A sweep runs one
 * reader per CPU it may use, each pinned to its CPU and walking every socket, and each terminates
 * those whose cookie falls in its shard: the work of terminating (a reset sent, the peer's answer
 * handled) is spread over the CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tether_sweep_shard SEC(".maps");

/* The agent parent cgroups, from index 0 to tether_config.parents - 1: the global programs ask
 * bpf_current_task_under_cgroup of these first, so that a process outside them costs a helper
 * call per parent and nothing else. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, TETHER_MAX_PARENTS);
	__type(key, __u32);
	__type(value, __u32);
} tether_parents SEC(".maps");

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;
/* Linux 6.13+: signal another task than the current one (a process moved by another). */
extern int bpf_send_signal_task(struct task_struct *task, int sig, enum pid_type type, __u64 value) __ksym __weak;

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

/* tether_no_match turns "no rule matched" into deny or, in audit mode, a would-deny. */
static __always_inline void tether_no_match(struct tether_decision *d, void *rules, __u8 reason)
{
	struct tether_rule_value *h = tether_header(rules);

	d->reason = reason;
	d->verdict = TETHER_VERDICT_DENY;
	if (h) {
		d->generation = h->generation;
		if (h->mode == TETHER_MODE_AUDIT)
			d->verdict = TETHER_VERDICT_AUDIT;
	}
}

/* tether_entry_match decides on an exec or unix entry that matched: allow, or audit-deny. */
static __always_inline void tether_entry_match(struct tether_decision *d, struct tether_rule_value *v)
{
	if (v->mode == TETHER_MODE_AUDIT) {
		d->verdict = TETHER_VERDICT_AUDIT;
		d->reason = TETHER_REASON_AUDIT_RULE;
		return;
	}
	d->verdict = TETHER_VERDICT_ALLOW;
	d->reason = TETHER_REASON_RULE;
}

static __always_inline int tether_port_rule_match(struct tether_decision *d, struct tether_port_rule *r, __u8 *reason,
						  const int current)
{
	if (r->proto && r->proto != d->proto)
		return 0;
	if (d->dport < r->port_lo || d->dport > r->port_hi)
		return 0;
	if (!(r->flags & TETHER_PORT_RULE_BINARY))
		return 1;
	if (current && d->caller == TETHER_CALLER_CURRENT) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
		d->caller = TETHER_CALLER_NONE;
		if (p) {
			d->caller = TETHER_CALLER_KNOWN;
			d->caller_dev = p->bin_dev;
			d->caller_ino = p->bin_ino;
		}
	}
	if (!current && d->caller == TETHER_CALLER_CURRENT)
		d->caller = TETHER_CALLER_NONE;
	if (d->caller != TETHER_CALLER_KNOWN) {
		*reason = TETHER_REASON_BINARY_UNKNOWN;
		return 0;
	}
	return d->caller_dev == r->bin_dev && d->caller_ino == r->bin_ino;
}

/* tether_take_use takes one use of a counted grant: 1 if it had one left and has not expired. */
static __always_inline int tether_take_use(__u32 grant)
{
	struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &grant);
	if (!u)
		return 0;
	if (u->expires_ns && bpf_ktime_get_boot_ns() >= u->expires_ns)
		return 0;
	if (u->left <= 0)
		return 0; /* used up: not decremented further */
	return __sync_fetch_and_add(&u->left, -1) > 0;
}

/* tether_grant_live says whether a connection a counted grant allowed may go on: until the grant
 * expires (or, for one without expiry, while it has uses left). It takes no use. */
static __always_inline int tether_grant_live(__u32 grant)
{
	struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &grant);
	if (!u)
		return 0;
	if (u->expires_ns)
		return bpf_ktime_get_boot_ns() < u->expires_ns;
	return u->left > 0;
}

/* tether_ports_allow walks a matched prefix's port rules (count of them, at most max): 1 when one
 * allows (d->max_ms is then its max_duration); else 0, with *audit_hit and *reason saying why
 * not. */
static __always_inline int tether_ports_allow(struct tether_decision *d, struct tether_port_rule *ports, __u32 count,
					      const int max, int *audit_hit, __u8 *reason, const int current)
{
	for (int i = 0; i < max; i++) {
		if (i >= count)
			break;
		struct tether_port_rule *r = &ports[i];
		if (!tether_port_rule_match(d, r, reason, current))
			continue;
		if (r->flags & TETHER_PORT_RULE_AUDIT) {
			*audit_hit = 1; /* a rule that allows silently may still follow */
			continue;
		}
		if (r->flags & TETHER_PORT_RULE_COUNTED) {
			int ok = d->recheck ? tether_grant_live(r->grant) : tether_take_use(r->grant);
			if (!ok) {
				*reason = TETHER_REASON_GRANT_SPENT; /* another rule may still allow */
				continue;
			}
		}
		d->max_ms = r->max_ms;
		d->grant = (r->flags & TETHER_PORT_RULE_COUNTED) ? r->grant : 0;
		return 1;
	}
	return 0;
}

/* tether_ports_verdict turns what tether_ports_allow found into d's verdict: allow, audit-deny
 * when only an audit rule matched, else no match for reason. */
static __always_inline void tether_ports_verdict(struct tether_decision *d, void *rules, int allowed, int audit_hit, __u8 reason)
{
	if (allowed) {
		d->verdict = TETHER_VERDICT_ALLOW;
		d->reason = TETHER_REASON_RULE;
	} else if (audit_hit) {
		d->verdict = TETHER_VERDICT_AUDIT;
		d->reason = TETHER_REASON_AUDIT_RULE;
	} else {
		tether_no_match(d, rules, reason);
	}
}

/* tether_mask64 keeps the first keep bits (in byte order) of 8 address bytes read as be. Two
 * halves, not 16 bytes, so that the verifier walks 9 ways through a mask, not 3^16. */
static __always_inline __u64 tether_mask64(__u64 be, int keep)
{
	if (keep >= 64)
		return be;
	if (keep <= 0)
		return 0;
	return bpf_cpu_to_be64(bpf_be64_to_cpu(be) & (~0ULL << (64 - keep)));
}

/* tether_mask copies the first bits bits of the 16-byte address in into out, the rest zero. */
static __always_inline void tether_mask(__u8 out[16], const __u8 in[16], __u32 bits)
{
	__u64 w[2];
	__builtin_memcpy(w, in, 16);
	w[0] = tether_mask64(w[0], (int)bits);
	w[1] = tether_mask64(w[1], (int)bits - 64);
	__builtin_memcpy(out, w, 16);
}

/* tether_host_match looks addr up in tether_hosts at prefixlen: the entry, unless it is missing
 * or retired (below the floor: a rule of an earlier rule set, not yet removed). */
static __always_inline struct tether_host_value *tether_host_match(struct tether_decision *d, __u32 prefixlen)
{
	struct tether_host_key hk = {};
	hk.buf = d->buf;
	hk.prefixlen = prefixlen;
	tether_mask(hk.addr, d->addr, prefixlen - 8);
	struct tether_host_value *h = bpf_map_lookup_elem(&tether_hosts, &hk);
	if (h && h->generation >= d->host_floor)
		return h;
	return NULL;
}

/* tether_egress_rules decides d (a connect, datagram or live socket to d->addr and d->dport) by
 * the rule set in d->buf: by the longest prefix that matches, whether it is in tether_hosts (a
 * host, or the bulk length) or the trie. rules is that rule set, or NULL to look it up only when
 * it is needed (a trie that could hold a longer match, or no match): a host rule that allows
 * decides without it. It returns the rule set (NULL if not looked up, or missing: then denied). */
static __always_inline void *tether_egress_rules(struct tether_decision *d, void *rules, const int current)
{
	int allowed = 0, audit_hit = 0;
	__u8 reason = TETHER_REASON_NO_RULE;
	__u32 len = 8 + 128; /* prefixlen of the tether_hosts match */
	struct tether_host_value *h = tether_host_match(d, len);
	if (!h && d->bulk) {
		len = d->bulk;
		h = tether_host_match(d, len);
	}
	struct tether_rule_value *v = NULL;
	if (d->trie_max && (!h || d->trie_max > len)) {
		if (!rules)
			rules = tether_ruleset(d);
		if (!rules)
			return NULL;
		struct tether_rule_key key = {};
		key.prefixlen = 8 + 128;
		key.kind = TETHER_RULE_EGRESS;
		__builtin_memcpy(key.data, d->addr, 16);
		v = bpf_map_lookup_elem(rules, &key);
		if (v && h && v->mode <= len)
			v = NULL; /* tether_hosts has the longer match */
	}
	if (v)
		allowed = tether_ports_allow(d, v->ports, v->count, TETHER_MAX_PORT_RULES, &audit_hit, &reason, current);
	else if (h)
		allowed = tether_ports_allow(d, h->ports, h->count, TETHER_HOST_PORT_RULES, &audit_hit, &reason, current);
	if (!allowed && !rules)
		rules = tether_ruleset(d);
	if (!allowed && !rules)
		return NULL;
	tether_ports_verdict(d, rules, allowed, audit_hit, reason);
	return rules;
}

/* tether_egress decides a connect or sendmsg of the current task to addr (IPv6 or v4-mapped)
 * and port. */
static __always_inline int tether_egress(struct tether_decision *d)
{
	void *rules = NULL;
	if (tether_begin_agent(d))
		rules = tether_egress_rules(d, NULL, 1);
	return tether_finish(d, rules);
}

static __always_inline void tether_addr4(__u8 addr[16], __u32 ip4_net)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(addr + 12, &ip4_net, 4);
}

/* tether_sock_deadline sets when socket s, allowed by the rule d says, must end: its rule's
 * max_duration after its connect (or, for a socket connected under a rule without one, after
 * the first check under a rule with one), or its counted grant's expiry if sooner (so that a connection an
 * approval opened ends with the approval even while tetherd is not there to install the rule set
 * without it). d->buf names the rule set, whose mode says whether the end is enforced. */
static __always_inline void tether_sock_deadline(struct tether_decision *d, struct tether_sock *s)
{
	if (d->max_ms && !s->start_ns)
		s->start_ns = bpf_ktime_get_boot_ns(); /* the first rule with a time limit starts the clock */
	__u64 dl = d->max_ms ? s->start_ns + (__u64)d->max_ms * 1000000 : 0;

	s->flags &= ~(TETHER_SOCK_DEADLINE_GRANT | TETHER_SOCK_DEADLINE_AUDIT | TETHER_SOCK_EXPIRED);
	if (d->grant) {
		__u32 g = d->grant;
		struct tether_grant_uses *u = bpf_map_lookup_elem(&tether_grant_uses, &g);
		if (u && u->expires_ns && (!dl || u->expires_ns < dl)) {
			dl = u->expires_ns;
			s->flags |= TETHER_SOCK_DEADLINE_GRANT;
		}
	}
	s->deadline_ns = dl;
	if (!dl)
		return;
	__u32 buf = d->buf;
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
	if (h && h->mode == TETHER_MODE_AUDIT)
		s->flags |= TETHER_SOCK_DEADLINE_AUDIT;
}

/* tether_connected records, in the socket's storage, that an agent connected it under the verdict
 * in d: from now on its packets are judged by it, and checked again whenever the agent's rule set
 * changes. */
static __always_inline void tether_connected(struct bpf_sock_addr *ctx, struct tether_decision *d)
{
	if (d->slot == TETHER_NO_SLOT || d->verdict == TETHER_VERDICT_DENY || !ctx->sk)
		return;
	if (d->proto != IPPROTO_TCP && d->proto != IPPROTO_UDP)
		return;
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		tether_count(TETHER_COUNTER_SOCK_STORAGE_ERRORS);
		return;
	}
	__u32 pid = bpf_get_current_pid_tgid() >> 32;
	__u64 bin_ino = d->caller == TETHER_CALLER_KNOWN ? d->caller_ino : 0;
	int timed = d->max_ms || d->grant;
	/* Connected again by the same process under the same rule set (a UDP socket that connects
	 * per request): the storage says it all already. */
	/* The connect's own record stands for an audit-deny of its packets. */
	__u16 flags = TETHER_SOCK_OUTBOUND | TETHER_SOCK_CHECKED | (d->verdict == TETHER_VERDICT_AUDIT ? TETHER_SOCK_REPORTED : 0);
	if (!timed && !s->deadline_ns && s->born == d->born && s->generation == d->generation && s->slot == d->slot &&
	    s->pid == pid && s->verdict == d->verdict && s->reason == d->reason && s->bin_ino == bin_ino && s->flags == flags)
		return;
	s->born = d->born;
	s->generation = d->generation;
	/* The clock of a time limit starts at the connect; without one it is not read (it starts
	 * when a rule with one first applies, see tether_sock_deadline). */
	s->start_ns = timed ? bpf_ktime_get_boot_ns() : 0;
	s->flags = flags;
	tether_sock_deadline(d, s);
	s->bin_dev = d->caller == TETHER_CALLER_KNOWN ? d->caller_dev : 0;
	s->bin_ino = bin_ino;
	s->slot = d->slot;
	s->pid = pid;
	s->verdict = d->verdict;
	s->reason = d->reason;
}

static __always_inline int tether_inet4(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct tether_decision d = {};

	d.kind = kind;
	d.family = AF_INET;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	tether_addr4(d.addr, ctx->user_ip4);
	int ok = tether_egress(&d);
	if (kind == TETHER_KIND_CONNECT4)
		tether_connected(ctx, &d);
	return ok;
}

static __always_inline int tether_inet6(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct tether_decision d = {};
	__u32 *addr = (__u32 *)d.addr;

	d.kind = kind;
	d.family = AF_INET6;
	d.proto = ctx->protocol;
	d.sock_type = ctx->type;
	d.dport = bpf_ntohs((__u16)ctx->user_port);
	/* ::ffff:a.b.c.d needs no special case: IPv4 rules are stored in that form. */
	addr[0] = ctx->user_ip6[0];
	addr[1] = ctx->user_ip6[1];
	addr[2] = ctx->user_ip6[2];
	addr[3] = ctx->user_ip6[3];
	int ok = tether_egress(&d);
	if (kind == TETHER_KIND_CONNECT6)
		tether_connected(ctx, &d);
	return ok;
}

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

/* tether_unix_key fills key->data from the n sun_path bytes the caller passed: a pathname up to its
 * first NUL (the kernel reads no further), or an abstract name as NUL, length, name bytes (its
 * length is part of its identity). It returns 0 when the address may not match any rule: none
 * given, or a pathname with a ".." component, which could climb out of a directory that a prefix
 * rule allows. */
static __always_inline int tether_unix_key(struct tether_rule_key *key, const char *path, __u64 n)
{
	if (n == 0)
		return 0;
	if (n > TETHER_UNIX_PATH_LEN)
		n = TETHER_UNIX_PATH_LEN;
	tether_barrier_var(n);
	char first = 0;
	if (bpf_probe_read_kernel(&first, 1, path))
		return 0;

	if (first == 0) {
		__u64 len = n - 1;
		if (len > TETHER_UNIX_PATH_LEN - 1)
			len = TETHER_UNIX_PATH_LEN - 1;
		tether_barrier_var(len);
		key->data[1] = len;
		if (len && bpf_probe_read_kernel(&key->data[2], len, path + 1))
			return 0;
		return 1;
	}

	/* Reads at most n + 1 bytes and turns the last one into a NUL: the kernel reads n bytes up
	 * to the first NUL. The byte past the caller's address is never used. */
	if (bpf_probe_read_kernel_str(key->data, n + 1, path) < 0)
		return 0;

	/* w holds the last three bytes; a leading '/' makes a leading ".." count too. */
	__u32 w = '/';
	for (int i = 0; i < TETHER_UNIX_PATH_LEN; i++) {
		__u8 c = key->data[i];
		if ((w & 0xffffff) == ('/' << 16 | '.' << 8 | '.') && (c == '/' || c == 0))
			return 0;
		if (c == 0)
			break;
		w = w << 8 | c;
	}
	return 1;
}

static __always_inline void tether_unix_target(char target[TETHER_PATH_LEN], struct tether_rule_key *key)
{
	if (key->data[0]) {
		__builtin_memcpy(target, key->data, TETHER_RULE_DATA);
		return;
	}
	/* Abstract: '@' then the name; NUL bytes inside the name stay NUL. */
	target[0] = '@';
	__builtin_memcpy(target + 1, &key->data[2], TETHER_RULE_DATA - 2);
}

/* tether_mnt_ns is the inode number of the current task's mount namespace. */
static __always_inline __u32 tether_mnt_ns(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	return BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum);
}

/* tether_other_mnt_ns says whether the current process runs in another mount namespace than its
 * agent's (its lineage's): there, a socket path may name another socket than the one granted. */
static __always_inline int tether_other_mnt_ns(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &tgid);
	/* An agent process with no lineage (tether_procs was full when it forked, on a kernel that
	 * cannot kill it then) has no namespace known to be the agent's: taken to be elsewhere. */
	if (!p)
		return 1;
	return p->mnt_ns && p->mnt_ns != tether_mnt_ns();
}

/* tether_unix_decide decides a connect or send to the unix address whose n sun_path bytes are at
 * path; d carries the kind and socket type. It returns 1 to allow, 0 to deny. global is set for
 * the LSM programs, which run for every process of the host: outside agents they only allow. */
static __always_inline int tether_unix_decide(struct tether_decision *d, const char *path, __u64 n, int global)
{
	struct tether_rule_key key = {};
	void *rules;

	d->family = AF_UNIX;
	key.kind = TETHER_RULE_UNIX;
	key.prefixlen = 8 + 8 * TETHER_RULE_DATA;
	int matchable = tether_unix_key(&key, path, n);

	rules = tether_begin(d);
	if (global && d->slot == TETHER_NO_SLOT && !(d->reason == TETHER_REASON_DEPTH && tether_under_parent()))
		return 1;
	if (rules) {
		struct tether_rule_value *v = matchable ? bpf_map_lookup_elem(rules, &key) : NULL;
		if (!v)
			tether_no_match(d, rules, TETHER_REASON_NO_RULE);
		else if (key.data[0] && tether_other_mnt_ns())
			tether_no_match(d, rules, TETHER_REASON_MOUNT_NS); /* a pathname, not an abstract name */
		else
			tether_entry_match(d, v);
	}

	tether_account(d);
	if (!tether_should_emit(d))
		return d->verdict != TETHER_VERDICT_DENY;
	if (d->generation == 0 && rules) {
		struct tether_rule_value *h = tether_header(rules);
		if (h)
			d->generation = h->generation;
	}
	struct tether_event *e = tether_event_reserve(d);
	if (e) {
		tether_unix_target(e->target, &key);
		tether_submit(e);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

static __always_inline int tether_unix(struct bpf_sock_addr *ctx, __u8 kind)
{
	struct bpf_sock_addr_kern *sa = bpf_cast_to_kern_ctx(ctx);
	struct tether_decision d = {};
	__u64 len = sa->uaddrlen;

	d.kind = kind;
	d.sock_type = ctx->type;
	/* offsetof(struct sockaddr_un, sun_path) is 2 */
	return tether_unix_decide(&d, (const char *)sa->uaddr + 2, len > 2 ? len - 2 : 0, 0);
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
		if (e)
			tether_submit(e);
	}
	return d.verdict != TETHER_VERDICT_DENY;
}

/* Inbound: an agent listens only on loopback or on the ports its listen rules name. */

/* tether_loopback says whether a 16-byte address (IPv4 as ::ffff:a.b.c.d) is loopback. */
static __always_inline int tether_loopback(const __u8 a[16])
{
	__u64 hi, lo;
	__builtin_memcpy(&hi, a, 8);
	__builtin_memcpy(&lo, a + 8, 8);
	if (hi == 0 && lo == bpf_cpu_to_be64(1))
		return 1; /* ::1 */
	return hi == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
}

/* tether_listen_rules decides d (a bind or a listener's port) by the agent's listen rules. */
static __always_inline void tether_listen_rules(struct tether_decision *d, void *rules)
{
	struct tether_rule_key key = {};
	int audit_hit = 0;
	__u8 reason = TETHER_REASON_BIND;

	key.prefixlen = 8;
	key.kind = TETHER_RULE_LISTEN;
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	int allowed = v && tether_ports_allow(d, v->ports, v->count, TETHER_MAX_PORT_RULES, &audit_hit, &reason, 1);
	tether_ports_verdict(d, rules, allowed, audit_hit, reason);
}

/* tether_bind decides a bind of the current task to d->addr and d->dport: loopback and port 0
 * (an ephemeral port, as a client takes; a listener on one is caught at ingress) are free. */
static __always_inline int tether_bind(struct tether_decision *d)
{
	if (d->dport == 0 || tether_loopback(d->addr))
		return 1;
	d->kind = TETHER_KIND_BIND;
	void *rules = tether_begin(d);
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return 1; /* not an agent */
	if (rules)
		tether_listen_rules(d, rules);
	tether_account(d);
	if (d->verdict != TETHER_VERDICT_ALLOW || tether_should_emit(d)) {
		struct tether_event *e = tether_event_reserve(d);
		if (e)
			tether_submit(e);
	}
	return d->verdict != TETHER_VERDICT_DENY;
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

/* Live sockets and their packets.
 *
 * A verdict taken at connect must hold for as long as the connection lives. The connect hooks
 * record, in the socket's storage (tether_socks), the rule-set generation that allowed it; when
 * the agent's rule set changes, the daemon sweeps the agent's live sockets (the iter programs)
 * and terminates with bpf_sock_destroy those whose destination the new rule set no longer allows
 * (the peer sees a reset, the agent ECONNABORTED). Behind that, tether_egress_skb looks at every
 * packet an agent socket sends: it drops the packets of a killed agent and of a socket whose
 * destination is no longer allowed (checked once per socket per generation), and packets whose
 * IP options or routing header would take them elsewhere than they are addressed. On a kernel
 * without bpf_sock_destroy (before 6.5) the drops alone do the job. */

#define TETHER_ETH_P_IP 0x0800
#define TETHER_ETH_P_IPV6 0x86DD
#define TETHER_NH_HOPOPTS 0
#define TETHER_NH_ROUTING 43
#define TETHER_NH_FRAGMENT 44
#define TETHER_NH_AH 51
#define TETHER_NH_DSTOPTS 60
#define TETHER_TCP_RST 0x04
#define TETHER_TCP_SYN 0x02
#define TETHER_TCP_ACK 0x10

/* What tether_egress_skb reads of a packet. */
struct tether_pkt {
	__u8 daddr[16]; /* IPv6, or IPv4 as ::ffff:a.b.c.d */
	__u16 dport;	/* host order; 0 when the header was not read */
	__u8 proto;
	__u8 detour; /* IPv4 options or an IPv6 routing header */
	__u8 rst;    /* a TCP reset without payload: the way a terminated connection ends */
	__u8 syn;    /* a TCP SYN without ACK: the socket is connecting */
};

/* tether_pkt_l4 reads the ports and TCP flags of the transport header at off; left is how many
 * bytes of the packet follow the IP header(s) up to its end. */
static __always_inline void tether_pkt_l4(struct __sk_buff *skb, struct tether_pkt *p, __u32 off, __s32 left)
{
	__u8 h[14];

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return;
	if (bpf_skb_load_bytes(skb, off, h, p->proto == IPPROTO_TCP ? 14 : 4))
		return;
	p->dport = (__u16)h[2] << 8 | h[3];
	if (p->proto != IPPROTO_TCP)
		return;
	__s32 payload = left - (__s32)(h[12] >> 4) * 4;
	__u8 flags = h[13];
	p->rst = (flags & TETHER_TCP_RST) && payload <= 0;
	p->syn = (flags & TETHER_TCP_SYN) && !(flags & TETHER_TCP_ACK);
}

/* tether_pkt_read reads the network header of an outgoing packet (skb->data is at it) and the
 * transport header. */
__attribute__((noinline)) int tether_pkt_read(struct __sk_buff *skb, struct tether_pkt *p)
{
	if (!p)
		return 0;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP)) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, 0, h, 20))
			return 0;
		__u32 ihl = (h[0] & 0x0f) * 4;
		p->proto = h[9];
		p->detour = ihl != 20;
		tether_addr4(p->daddr, *(__u32 *)&h[16]);
		__u16 frag = (__u16)h[6] << 8 | h[7];
		if (ihl >= 20 && !(frag & 0x1fff))
			tether_pkt_l4(skb, p, ihl, ((__s32)h[2] << 8 | h[3]) - (__s32)ihl);
		return 0;
	}
	if (skb->protocol != bpf_htons(TETHER_ETH_P_IPV6))
		return 0;
	__u8 h[40];
	if (bpf_skb_load_bytes(skb, 0, h, 40))
		return 0;
	__builtin_memcpy(p->daddr, &h[24], 16);
	__u8 nh = h[6];
	__u32 off = 40;
	int frag = 0;
	/* Extension headers: a routing header of any type sends the packet to its next segment
	 * instead of its destination. The offset is kept in a known range so that the verifier's
	 * paths through the loop meet again instead of multiplying. */
	for (int i = 0; i < 6; i++) {
		__u8 x[2];
		if (nh == IPPROTO_TCP || nh == IPPROTO_UDP)
			break;
		if (nh == TETHER_NH_ROUTING)
			p->detour = 1;
		else if (nh != TETHER_NH_HOPOPTS && nh != TETHER_NH_DSTOPTS && nh != TETHER_NH_FRAGMENT && nh != TETHER_NH_AH)
			break;
		if (bpf_skb_load_bytes(skb, off, x, 2))
			return 0;
		__u32 units = nh == TETHER_NH_FRAGMENT ? 0 : x[1];
		__u32 len = nh == TETHER_NH_AH ? (units + 2) << 2 : (units + 1) << 3;
		frag |= nh == TETHER_NH_FRAGMENT; /* not the first fragment, or not only: ports may be elsewhere */
		nh = x[0];
		off = (off + len) & 0x7ff;
		tether_barrier_var(off);
	}
	p->proto = nh;
	if (!frag)
		tether_pkt_l4(skb, p, off, ((__s32)h[4] << 8 | h[5]) - ((__s32)off - 40));
	return 0;
}

/* tether_pkt_read_dst reads the destination address of a packet (skb->data at its network
 * header). */
static __always_inline void tether_pkt_read_dst(struct __sk_buff *skb, struct tether_pkt *p)
{
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP)) {
		__u32 a;
		if (!bpf_skb_load_bytes(skb, 16, &a, 4))
			tether_addr4(p->daddr, a);
		return;
	}
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IPV6))
		bpf_skb_load_bytes(skb, 24, p->daddr, 16);
}

/* tether_skb_slot finds the agent of the socket of skb from its cgroup: the nearest one bound of
 * the cgroup and its ancestors, walked from the root down (64 levels at most). Unlike the task
 * hooks, which look 16 levels up, it finds an agent however deep below it the socket was made:
 * such a socket got no connect past the hooks, and its agent's rules are the ones to judge it. One
 * walk from the root keeps the verifier's paths few: the cgroup's own level is not known first. */
static __always_inline int tether_skb_slot(struct __sk_buff *skb, __u64 *cgroup_id, __u32 *slot)
{
	__u64 own = bpf_skb_cgroup_id(skb);
	int found = 0;

	*cgroup_id = own;
	for (int l = 0; l < 64; l++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, l);
		if (!id)
			break;
		struct tether_binding *b = bpf_map_lookup_elem(&tether_cgroups, &id);
		if (b) {
			*slot = b->slot;
			found = 1;
		}
		if (id == own)
			break;
	}
	return found;
}

/* tether_sock_current says whether socket storage s still belongs to the agent (or, for a socket
 * of no agent, to the bindings) it was attributed to; agent gets that agent. */
static __always_inline int tether_sock_current(struct tether_sock *s, struct tether_agent **agent)
{
	__u32 zero = 0;

	if (s->slot == TETHER_NO_SLOT) {
		struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
		return cfg && s->born == cfg->bindings_gen;
	}
	__u32 slot = s->slot;
	*agent = bpf_map_lookup_elem(&tether_agents, &slot);
	return *agent && (*agent)->born == s->born;
}

/* tether_sock_attribute gives socket storage s (new, or of an agent that is gone) the agent slot
 * now has, and starts it unchecked. */
static __always_inline void tether_sock_attribute(struct tether_sock *s, __u32 slot, struct tether_agent **agent)
{
	__u32 zero = 0;

	s->slot = slot;
	s->generation = 0;
	s->flags &= TETHER_SOCK_OUTBOUND;
	s->born = 0;
	if (slot == TETHER_NO_SLOT) {
		struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
		if (cfg)
			s->born = cfg->bindings_gen;
		return;
	}
	*agent = bpf_map_lookup_elem(&tether_agents, &slot);
	if (*agent)
		s->born = (*agent)->born;
}

/* tether_sock_event records a decision on a socket from a context that is not the socket's
 * process (a packet, a sweep): the process that connected it, and its lineage while it lives. */
__attribute__((noinline)) int tether_sock_event(struct tether_decision *d, struct tether_sock *s, __u32 uid)
{
	if (!d)
		return 0;
	tether_account(d);
	struct tether_event *e = bpf_ringbuf_reserve(&tether_events, sizeof(*e), 0);
	if (!e) {
		tether_count(TETHER_COUNTER_RINGBUF_DROPS);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->generation = d->generation;
	e->cgroup_id = d->cgroup_id;
	e->slot = d->slot;
	e->uid = uid;
	e->kind = d->kind;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->proto = d->proto;
	e->dport = d->dport;
	e->family = d->family;
	e->sock_type = d->proto == IPPROTO_TCP ? SOCK_STREAM : SOCK_DGRAM;
	__builtin_memcpy(e->daddr, d->addr, sizeof(e->daddr));
	if (!s) {
		tether_submit(e);
		return 0;
	}
	e->pid = s->pid;
	e->bin_dev = s->bin_dev;
	e->bin_ino = s->bin_ino;
	struct tether_proc *p = tether_event_lineage(e, !s->bin_ino);
	if (p)
		__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	tether_submit(e);
	return 0;
}

/* tether_sock_expired turns the verdict on socket s, past its deadline, into a deny (a would-deny
 * in audit mode): max-duration, or revoked when the deadline was its counted grant's expiry. */
static __always_inline void tether_sock_expired(struct tether_decision *d, struct tether_sock *s)
{
	d->verdict = (s->flags & TETHER_SOCK_DEADLINE_AUDIT) ? TETHER_VERDICT_AUDIT : TETHER_VERDICT_DENY;
	d->reason = (s->flags & TETHER_SOCK_DEADLINE_GRANT) ? TETHER_REASON_REVOKED : TETHER_REASON_MAX_DURATION;
	s->flags |= TETHER_SOCK_EXPIRED;
}

/* tether_sock_check decides, once per rule-set generation, whether the agent's rule set in force
 * still allows the destination of socket s (d carries its slot, address, port and protocol), and
 * keeps the answer in s: verdict, and reason revoked (or max-duration) when it does not. It
 * returns 1 when the answer is new (the caller records it when it is not an allow). */
__attribute__((noinline)) int tether_sock_check(struct tether_decision *d, struct tether_sock *s)
{
	if (!d || !s)
		return 0;
	__u32 slot = d->slot;
	struct tether_agent *agent = bpf_map_lookup_elem(&tether_agents, &slot);
	if (agent) {
		__u32 active = agent->active & 1;
		__u64 gen = agent->generation[active];
		__u32 state = agent->flags & (TETHER_AGENT_ACTIVE | TETHER_AGENT_KILLED);
		__u64 expires = agent->expires[active];
		int live = !expires || bpf_ktime_get_boot_ns() < expires;
		if (state == TETHER_AGENT_ACTIVE && s->generation == gen && (s->flags & TETHER_SOCK_CHECKED) && live) {
			if (s->flags & TETHER_SOCK_EXPIRY_REPORTED)
				s->flags &= ~TETHER_SOCK_EXPIRY_REPORTED; /* its expiry moved */
			d->generation = gen;
			d->verdict = s->verdict;
			d->reason = s->reason;
			if (s->deadline_ns && !(s->flags & TETHER_SOCK_EXPIRED) && bpf_ktime_get_boot_ns() >= s->deadline_ns) {
				tether_sock_expired(d, s);
				s->verdict = d->verdict;
				s->reason = d->reason;
				s->flags &= ~TETHER_SOCK_REPORTED;
				return 1;
			}
			return 0;
		}
	}
	d->recheck = 1;
	d->caller = TETHER_CALLER_NONE;
	if (s->bin_ino) {
		d->caller = TETHER_CALLER_KNOWN;
		d->caller_dev = s->bin_dev;
		d->caller_ino = s->bin_ino;
	} else {
		__u32 pid = s->pid;
		struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &pid);
		if (p) {
			d->caller = TETHER_CALLER_KNOWN;
			d->caller_dev = p->bin_dev;
			d->caller_ino = p->bin_ino;
		}
	}
	void *rules = tether_begin_slot(d, &slot);
	if (rules)
		tether_egress_rules(d, rules, 0);
	if (d->verdict != TETHER_VERDICT_ALLOW && d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_EXPIRED)
		d->reason = TETHER_REASON_REVOKED;
	s->deadline_ns = 0;
	if (d->verdict != TETHER_VERDICT_DENY) {
		tether_sock_deadline(d, s);
		if (s->deadline_ns && bpf_ktime_get_boot_ns() >= s->deadline_ns)
			tether_sock_expired(d, s);
	}
	if (d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_EXPIRED) {
		/* A killed agent's sockets are judged again when it is readmitted; an expired rule
		 * set's, when it is replaced or its expiry moved. */
		s->flags &= ~TETHER_SOCK_EXPIRY_REPORTED;
		s->generation = d->generation;
		s->verdict = d->verdict;
		s->reason = d->reason;
		s->flags |= TETHER_SOCK_CHECKED;
	}
	s->flags &= ~TETHER_SOCK_REPORTED;
	return 1;
}


/* Every packet an agent socket sends, at the agent parents. Its cost in the common case is the
 * socket storage lookup, the agent's state and one compare. */
/* tether_plain says, from the packet's first bytes, that it carries no IPv4 option and no IPv6
 * extension header (the common case: no detour possible). */
static __always_inline int tether_plain(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *h = data;

	if (data + 40 > end)
		return 0;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP))
		return h[0] == 0x45;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IPV6))
		return h[6] == IPPROTO_TCP || h[6] == IPPROTO_UDP;
	return 0;
}

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
	/* The common cases, with no decision to build: a socket of a process in no agent (below an
	 * agent parent: a pod that is not an agent, say) while no binding has changed; a plain
	 * packet of a socket of a live agent, one the agent accepted or sends unconnected datagrams
	 * on (judged by sendmsg), or a TCP socket allowed at the generation in force with no
	 * deadline. */
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
				/* A connect no hook saw (the socket was made before the programs
				 * were attached): judged from its first packet on. */
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

	if (d.slot == TETHER_NO_SLOT) {
		/* A socket of no agent: only one its agent connected and then lost (unregistered)
		 * is judged, as any connect of a cgroup of no agent. */
		if (!s || !(s->flags & TETHER_SOCK_OUTBOUND) || tether_unknown_cgroup_allow || p.rst)
			return 1;
		d.verdict = TETHER_VERDICT_DENY;
		d.reason = TETHER_REASON_UNKNOWN_CGROUP;
		if (!(s->flags & TETHER_SOCK_REPORTED)) {
			s->flags |= TETHER_SOCK_REPORTED;
			tether_sock_event(&d, s, bpf_get_socket_uid(skb));
		} else {
			tether_count(TETHER_COUNTER_UNKNOWN_CGROUP);
		}
		return 0;
	}

	if (p.detour) {
		d.verdict = TETHER_VERDICT_DENY;
		d.reason = TETHER_REASON_DETOUR;
		if (agent) {
			__u32 active = agent->active & 1, buf = d.slot * 2 + active;
			d.generation = agent->generation[active];
			void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
			struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
			if (h && h->mode == TETHER_MODE_AUDIT && !(agent->flags & TETHER_AGENT_KILLED))
				d.verdict = TETHER_VERDICT_AUDIT;
		}
		if (!s || !(s->flags & TETHER_SOCK_DETOUR_REPORTED)) {
			if (s)
				s->flags |= TETHER_SOCK_DETOUR_REPORTED;
			tether_sock_event(&d, s, bpf_get_socket_uid(skb));
		} else {
			tether_account(&d);
		}
		return d.verdict != TETHER_VERDICT_DENY;
	}

	if (agent && (agent->flags & TETHER_AGENT_KILLED)) {
		if (p.rst)
			return 1;
		d.verdict = TETHER_VERDICT_DENY;
		d.reason = TETHER_REASON_KILLED;
		d.generation = agent->generation[agent->active & 1];
		if (!s || !(s->flags & TETHER_SOCK_KILL_REPORTED)) {
			if (s)
				s->flags |= TETHER_SOCK_KILL_REPORTED;
			tether_sock_event(&d, s, bpf_get_socket_uid(skb));
		} else {
			tether_account(&d);
		}
		return 0;
	}
	if (s && (s->flags & TETHER_SOCK_KILL_REPORTED))
		s->flags &= ~TETHER_SOCK_KILL_REPORTED; /* readmitted */

	if (!s || !(s->flags & TETHER_SOCK_OUTBOUND))
		return 1; /* accepted, or unconnected datagrams: sendmsg judged each */
	/* The socket's own destination, not the packet's: one check stands for all its packets. */
	d.proto = sk->protocol;
	d.dport = bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET) {
		tether_addr4(d.addr, sk->dst_ip4);
	} else {
		__u32 *a = (__u32 *)d.addr;
		a[0] = sk->dst_ip6[0];
		a[1] = sk->dst_ip6[1];
		a[2] = sk->dst_ip6[2];
		a[3] = sk->dst_ip6[3];
	}
	if (sk->protocol == IPPROTO_UDP) {
		/* A datagram to another address than the socket's (sendto on a connected socket)
		 * was judged by sendmsg; one from a socket no longer connected too. */
		__u64 *x = (__u64 *)d.addr, *y = (__u64 *)p.daddr;
		if (sk->dst_port == 0 || d.dport != p.dport || x[0] != y[0] || x[1] != y[1])
			return 1;
	}
	int fresh_answer = tether_sock_check(&d, s);
	if (d.verdict == TETHER_VERDICT_ALLOW)
		return 1;
	if (d.verdict == TETHER_VERDICT_DENY && p.rst)
		return 1;
	if (d.reason == TETHER_REASON_EXPIRED) {
		/* Not kept as the socket's answer (see tether_sock_check): recorded once per socket
		 * and expiry. */
		if (!(s->flags & TETHER_SOCK_EXPIRY_REPORTED)) {
			s->flags |= TETHER_SOCK_EXPIRY_REPORTED;
			tether_sock_event(&d, s, bpf_get_socket_uid(skb));
		} else if (d.verdict == TETHER_VERDICT_DENY) {
			tether_account(&d);
		}
		return d.verdict != TETHER_VERDICT_DENY;
	}
	if (fresh_answer || !(s->flags & TETHER_SOCK_REPORTED)) {
		s->flags |= TETHER_SOCK_REPORTED;
		tether_sock_event(&d, s, bpf_get_socket_uid(skb));
	} else if (d.verdict == TETHER_VERDICT_DENY) {
		tether_account(&d);
	}
	return d.verdict != TETHER_VERDICT_DENY;
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

/* The change time of an inode in nanoseconds: a write, a truncate, a chmod or a rename of the file
 * sets it. Its field moved twice (6.6, 6.11); these flavours read it on each kernel. */
struct inode___v611 {
	time64_t i_ctime_sec;
	u32 i_ctime_nsec;
} __attribute__((preserve_access_index));
struct inode___v66 {
	struct timespec64 __i_ctime;
} __attribute__((preserve_access_index));
struct inode___v61 {
	struct timespec64 i_ctime;
} __attribute__((preserve_access_index));

static __always_inline __u64 tether_ctime(struct inode *inode)
{
	struct inode___v611 *a = (void *)inode;
	struct inode___v66 *b = (void *)inode;
	struct inode___v61 *c = (void *)inode;
	/* Since 6.13 the top bit of i_ctime_nsec says that the time was queried (multigrain
	 * timestamps); nanoseconds never reach it. */
	if (bpf_core_field_exists(a->i_ctime_sec))
		return (__u64)BPF_CORE_READ(a, i_ctime_sec) * 1000000000ULL + (BPF_CORE_READ(a, i_ctime_nsec) & 0x7fffffff);
	if (bpf_core_field_exists(b->__i_ctime))
		return (__u64)BPF_CORE_READ(b, __i_ctime.tv_sec) * 1000000000ULL + BPF_CORE_READ(b, __i_ctime.tv_nsec);
	return (__u64)BPF_CORE_READ(c, i_ctime.tv_sec) * 1000000000ULL + BPF_CORE_READ(c, i_ctime.tv_nsec);
}

/* tether_exec_decide decides an exec of the file bprm->file by the current task, in an agent or
 * too deep below an agent parent to tell (then d->slot is TETHER_NO_SLOT and the verdict deny).
 * A granted file counts only while its change time is the one granted: a file rewritten in place
 * (same inode) is denied for modified-file until tetherd has checked its digest and granted it
 * again. */
static __always_inline void tether_exec_decide(struct tether_decision *d, struct linux_binprm *bprm,
					       void **rules_out)
{
	d->kind = TETHER_KIND_EXEC;
	void *rules = tether_begin(d);
	*rules_out = rules;
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return;

	struct file *file = BPF_CORE_READ(bprm, file);
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	d->bin_dev = BPF_CORE_READ(inode, i_sb, s_dev);
	d->bin_ino = BPF_CORE_READ(inode, i_ino);
	if (!rules)
		return;

	struct tether_rule_key key = {};
	key.prefixlen = 8 + 8 * 12;
	key.kind = TETHER_RULE_EXEC;
	__builtin_memcpy(key.data, &d->bin_dev, 4);
	__builtin_memcpy(key.data + 4, &d->bin_ino, 8);
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	if (!v) {
		tether_no_match(d, rules, TETHER_REASON_NO_RULE);
		return;
	}
	if (v->generation != tether_ctime(inode)) {
		tether_no_match(d, rules, TETHER_REASON_MODIFIED_FILE);
		return;
	}
	tether_entry_match(d, v);
}

static __always_inline void tether_exec_event(struct tether_decision *d, void *rules,
					      struct linux_binprm *bprm)
{
	tether_account(d);
	if (!tether_should_emit(d))
		return;
	if (d->generation == 0 && rules) {
		struct tether_rule_value *h = tether_header(rules);
		if (h)
			d->generation = h->generation;
	}
	struct tether_event *e = tether_event_reserve(d);
	if (!e)
		return;
	bpf_probe_read_kernel_str(e->target, sizeof(e->target), BPF_CORE_READ(bprm, filename));
	tether_submit(e);
}

/* tether_live_agent returns the agent a lineage entry belongs to while it is still that agent
 * (the slot has not been cleared or given to another), else NULL. */
static __always_inline struct tether_agent *tether_live_agent(struct tether_proc *p)
{
	__u32 slot = p->slot;
	struct tether_agent *a = bpf_map_lookup_elem(&tether_agents, &slot);
	if (!a || a->born != p->born || !(a->flags & TETHER_AGENT_ACTIVE))
		return NULL;
	return a;
}

/* tether_exec_lineage records the binary an agent process now runs: 0, or -1 when tether_procs
 * has no room for it. */
static __always_inline int tether_exec_lineage(struct task_struct *task, __u32 slot,
						struct linux_binprm *bprm, struct tether_decision *d)
{
	__u32 tgid = BPF_CORE_READ(task, tgid);
	struct tether_proc *old = bpf_map_lookup_elem(&tether_procs, &tgid);
	struct tether_proc p = {};

	if (old) {
		p.ppid = old->ppid;
		p.start_ns = old->start_ns;
		p.mnt_ns = old->slot == slot && old->born == d->born ? old->mnt_ns : 0;
	} else {
		p.ppid = BPF_CORE_READ(task, real_parent, tgid);
		p.start_ns = bpf_ktime_get_boot_ns();
	}
	if (!p.mnt_ns)
		p.mnt_ns = tether_mnt_ns(); /* the first exec in the agent: its namespace is the agent's */
	p.slot = slot;
	p.born = d->born;
	p.bin_dev = d->bin_dev;
	p.bin_ino = d->bin_ino;
	bpf_get_current_comm(p.comm, sizeof(p.comm));
	bpf_probe_read_kernel_str(p.path, sizeof(p.path), BPF_CORE_READ(bprm, filename));
	if (bpf_map_update_elem(&tether_procs, &tgid, &p, BPF_ANY)) {
		tether_count(TETHER_COUNTER_LINEAGE_UPDATE_ERRORS);
		return -1;
	}
	return 0;
}

/* tether_migrated records that the agent process tgid (lineage p) is found outside its agent
 * and, unless its agent is in audit mode, kills it: the current task when it is that process,
 * else through bpf_send_signal_task where the kernel has it (6.13+), else tetherd does on the
 * record. target names where it went. Returns 1 when it was signalled. */
static __always_inline int tether_migrated(struct task_struct *task, struct tether_proc *p, struct tether_agent *agent,
					   __u64 cgroup_id, const char *where, int late)
{
	struct tether_decision d = {};
	__u32 tgid = BPF_CORE_READ(task, tgid);
	int signalled = 0;

	d.kind = TETHER_KIND_MIGRATE;
	d.slot = p->slot;
	d.cgroup_id = cgroup_id;
	d.bin_dev = p->bin_dev;
	d.bin_ino = p->bin_ino;
	d.reason = TETHER_REASON_MIGRATION;
	d.verdict = TETHER_VERDICT_DENY;
	__u32 active = agent->active & 1, buf = p->slot * 2 + active;
	d.generation = agent->generation[active];
	void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
	struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
	if (h && h->mode == TETHER_MODE_AUDIT && !(agent->flags & TETHER_AGENT_KILLED))
		d.verdict = TETHER_VERDICT_AUDIT;
	if (late)
		tether_count(TETHER_COUNTER_MIGRATIONS_LATE);
	if (d.verdict == TETHER_VERDICT_DENY) {
		if ((__u32)(bpf_get_current_pid_tgid() >> 32) == tgid)
			signalled = bpf_send_signal(SIGKILL) == 0;
		else if (bpf_ksym_exists(bpf_send_signal_task))
			signalled = bpf_send_signal_task(task, SIGKILL, PIDTYPE_TGID, 0) == 0;
		if (!signalled)
			tether_count(TETHER_COUNTER_SIGNAL_ERRORS);
	}
	tether_account(&d);
	struct tether_event *e = bpf_ringbuf_reserve(&tether_events, sizeof(*e), 0);
	if (!e) {
		tether_count(TETHER_COUNTER_RINGBUF_DROPS);
		return signalled;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->generation = d.generation;
	e->cgroup_id = cgroup_id;
	e->slot = d.slot;
	e->pid = tgid;
	/* tid: the process that moved it (itself, or another); its tetherd-side kill needs to
	 * know whether the kernel already did. */
	e->tid = bpf_get_current_pid_tgid() >> 32;
	e->uid = BPF_CORE_READ(task, cred, uid.val);
	e->kind = d.kind;
	e->verdict = d.verdict;
	e->reason = d.reason;
	e->proto = signalled;
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	tether_event_lineage(e, 1);
	if (where)
		bpf_probe_read_kernel_str(e->target, sizeof(e->target), where);
	tether_submit(e);
	return signalled;
}

/* tether_cgroup_in_slot says whether the nearest bound cgroup of cg and its ancestors (64 levels
 * at most: a move is rare, and a move deep below its own agent is no migration) is slot's. */
static __always_inline int tether_cgroup_in_slot(struct cgroup *cg, __u32 slot)
{
	__u32 found = TETHER_NO_SLOT;
	return tether_cgroup_slot(cg, &found, 64) && found == slot;
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

/* Guards that only BPF LSM can place: they refuse, for agents, what no cgroup hook sees. Each runs
 * for every process of the host and costs a process outside the agent parents a helper call per
 * parent. */

/* tether_guard_decide finds the current task's agent for an LSM guard: 1 with d filled in (a deny,
 * or audit-deny in audit mode, for reason) when the guard applies to it, 0 when the task is in no
 * agent. */
static __always_inline int tether_guard_decide(struct tether_decision *d, __u8 kind, __u8 reason)
{
	if (!tether_under_parent())
		return 0;
	d->kind = kind;
	void *rules = tether_begin(d);
	if (d->slot == TETHER_NO_SLOT && d->reason != TETHER_REASON_DEPTH)
		return 0;
	if (rules)
		tether_no_match(d, rules, reason);
	else if (d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_DEPTH)
		d->reason = reason;
	return 1;
}

/* tether_guard_finish records d (target names what was refused) and returns the hook's answer. */
static __always_inline int tether_guard_finish(struct tether_decision *d, const char *target)
{
	tether_account(d);
	struct tether_event *e = tether_event_reserve(d);
	if (e) {
		if (target)
			bpf_probe_read_kernel_str(e->target, sizeof(e->target), target);
		tether_submit(e);
	}
	return d->verdict == TETHER_VERDICT_DENY ? -EPERM : 0;
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

/* tether_unix_dir_match looks the peer socket file dentry up among the rule set's unix directory
 * entries: its directory with its name (an exact path rule), or its directory or one of theirs
 * above it (a prefix rule, "/dir/" then "*"). */
static __always_inline struct tether_rule_value *tether_unix_dir_match(void *rules, struct dentry *dentry)
{
	struct tether_rule_key key = {};
	__u32 dev = BPF_CORE_READ(dentry, d_sb, s_dev);
	struct dentry *dir = BPF_CORE_READ(dentry, d_parent);
	__u64 ino = BPF_CORE_READ(dir, d_inode, i_ino);

	key.kind = TETHER_RULE_UNIX_DIR;
	__builtin_memcpy(key.data, &dev, 4);
	__builtin_memcpy(key.data + 4, &ino, 8);
	int n = bpf_probe_read_kernel_str(key.data + 12, TETHER_RULE_DATA - 12, BPF_CORE_READ(dentry, d_name.name));
	key.prefixlen = 8 + 8 * (12 + (n > 0 ? n : 0)); /* the NUL included: an exact name */
	struct tether_rule_value *v = bpf_map_lookup_elem(rules, &key);
	if (v)
		return v;
	__builtin_memset(key.data + 12, 0, TETHER_RULE_DATA - 12);
	key.prefixlen = 8 + 8 * 12;
	for (int i = 0; i < TETHER_MAX_ANCESTORS; i++) {
		struct dentry *up = BPF_CORE_READ(dir, d_parent);
		if (up == dir)
			break; /* the root of its file system */
		dir = up;
		ino = BPF_CORE_READ(dir, d_inode, i_ino);
		__builtin_memcpy(key.data + 4, &ino, 8);
		v = bpf_map_lookup_elem(rules, &key);
		if (v)
			return v;
	}
	return NULL;
}

/* tether_unix_peer decides, under BPF LSM, a connect or send of the current task to the unix
 * socket other by the file it is bound to: a granted path counts only while it leads to the
 * granted socket file (or below a granted directory), whatever the agent's view of the path (a
 * mount over it, in its namespace or another). Abstract and unbound peers are the string hooks'. */
static __always_inline int tether_unix_peer(struct sock *other, __u8 kind, int sock_type)
{
	struct tether_decision d = {};
	struct unix_sock *u = (struct unix_sock *)other;
	struct dentry *dentry = BPF_CORE_READ(u, path.dentry);

	if (!dentry || !tether_under_parent())
		return 0;
	d.kind = kind;
	d.family = AF_UNIX;
	d.sock_type = sock_type;
	void *rules = tether_begin(&d);
	if (d.slot == TETHER_NO_SLOT && d.reason != TETHER_REASON_DEPTH)
		return 0;
	if (rules) {
		struct tether_rule_value *v = tether_unix_dir_match(rules, dentry);
		if (!v)
			tether_no_match(&d, rules, TETHER_REASON_MOUNT_NS);
		else
			tether_entry_match(&d, v);
	}
	if (d.verdict == TETHER_VERDICT_ALLOW) {
		tether_account(&d);
		return 0; /* the string hook has recorded the allow, sampled */
	}
	return tether_guard_finish(&d, (const char *)BPF_CORE_READ(dentry, d_name.name));
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
