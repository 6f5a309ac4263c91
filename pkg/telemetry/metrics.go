// Package telemetry exports tether's metrics for Prometheus, from its own registry: decisions
// (the kernel's per-agent counters, complete, not the sampled event stream), agents and tasks,
// policy evaluations, anything lost (ring buffer, records, sinks, map writes), identities lost,
// kill-path steps, the kernel's run statistics of each BPF program and how full its maps are,
// build info. Labels are bounded by the number of agents: kind, verdict, SPIFFE
// ID, step; never a destination or a pid.
package telemetry

import (
	"fmt"
	"net"
	"net/http"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/panics"
)

// Source is what the metrics read at each scrape.
type Source interface {
	Stats() Stats
	Agents() []agents.Agent
	// KernelStats reads the programs' run statistics and how full the maps are.
	KernelStats() KernelStats
}

// Stats is what tetherd's stages count, as the metrics read them.
type Stats struct {
	Registry          agents.Stats
	PolicyRefused     uint64 // policy revisions refused
	Kernel            dataplane.Counters
	Events            events.Stats
	DecisionLogHTTP   *events.HTTPStats // nil: no collector configured
	IdentityLost      uint64
	EscalationSent    uint64
	EscalationDropped uint64
	Sweeps            dataplane.SweepStats
}

// KernelStats is what the kernel says of tether's programs and maps.
type KernelStats struct {
	// StatsEnabled says whether the kernel counts program runs (BPF_ENABLE_STATS); without it
	// Programs stay at zero.
	StatsEnabled bool
	Programs     map[string]dataplane.ProgramStat // by hook
	Fill         map[string]dataplane.MapFill     // by map: agents, cgroups, procs, host_rules, rules, ring_buffer
	Memory       *dataplane.MapMemory             // the maps' kernel memory (nil: not read)
	Err          error                            // what could not be read (the rest is still exported)
}

// Metrics is tether's registry.
type Metrics struct {
	reg        *prometheus.Registry
	coll       *collector
	evalTime   prometheus.Histogram
	killSteps  *prometheus.HistogramVec
	kills      *prometheus.CounterVec
	guards     *prometheus.CounterVec // tether_guard_denials_total
	identities prometheus.Counter
}

// New registers tether's metrics, reading src at each scrape.
func New(src Source, version string) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.evalTime = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name: "tether_policy_evaluation_duration_seconds", Help: "Time of one evaluation of data.tether.grants for an agent.",
		Buckets: prometheus.ExponentialBuckets(50e-6, 2, 16),
	})
	m.killSteps = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "tether_kill_step_duration_seconds", Help: "Duration of each kill-path step (deny, freeze, revoke, halt).",
		Buckets: prometheus.ExponentialBuckets(10e-6, 4, 12),
	}, []string{"step"})
	m.kills = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_kills_total", Help: "Kills run, by who asked (admin or policy) and whether every step is done.",
	}, []string{"requester", "done"})
	m.guards = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_guard_denials_total",
		Help: "Denials (and audit-denials) of the kernel guards, as recorded, by reason: migration, depth, modified-file, mount-ns, family, userns, ptrace, bind, bpf.",
	}, []string{"reason", "verdict"})
	for _, r := range GuardReasons {
		m.guards.WithLabelValues(string(r), "deny") // present at 0 from the start
	}
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tether_build_info", Help: "tetherd's version and Go version."}, []string{"version", "goversion"})
	buildInfo.WithLabelValues(version, runtime.Version()).Set(1)
	m.coll = &collector{src: src, seen: map[slotKey]dataplaneCounts{}, totals: map[decisionKey]uint64{}}
	m.reg.MustRegister(m.evalTime, m.killSteps, m.kills, m.guards, buildInfo, m.coll,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// Retire folds the final decision counts of an agent that is being unregistered into the
// totals (give it the view with counts, as agents.Options.Retiring does).
func (m *Metrics) Retire(a agents.Agent) {
	c := m.coll
	c.mu.Lock()
	defer c.mu.Unlock()
	key := slotKey{a.Slot, a.Registered, a.CgroupID}
	c.fold(key, a)
	delete(c.seen, key)
}

// ObserveEvaluation records the duration of one grants evaluation.
func (m *Metrics) ObserveEvaluation(d time.Duration) { m.evalTime.Observe(d.Seconds()) }

// GuardReasons are the reasons of the kernel guards' denials.
var GuardReasons = []events.Reason{
	events.KernelReason(dataplane.ReasonMigration), events.KernelReason(dataplane.ReasonDepth), events.KernelReason(dataplane.ReasonModifiedFile),
	events.KernelReason(dataplane.ReasonMountNS), events.KernelReason(dataplane.ReasonFamily), events.KernelReason(dataplane.ReasonUserNS),
	events.KernelReason(dataplane.ReasonPtrace), events.KernelReason(dataplane.ReasonBind), events.KernelReason(dataplane.ReasonBPF),
}

// ObserveGuard counts a decision record when a kernel guard denied (or would have).
func (m *Metrics) ObserveGuard(rec events.Decision) {
	if rec.Verdict != events.VerdictAllow && slices.Contains(GuardReasons, rec.Reason) {
		m.guards.WithLabelValues(string(rec.Reason), string(rec.Verdict)).Inc()
	}
}

// ObserveKill records a kill record (kind "kill") of the decision log.
func (m *Metrics) ObserveKill(rec events.Decision) {
	if rec.Kill == nil {
		return
	}
	who := "admin"
	if len(rec.Kill.Requester) >= 7 && rec.Kill.Requester[:7] == "policy:" {
		who = "policy"
	}
	done := "false"
	if rec.Kill.Done {
		done = "true"
	}
	m.kills.WithLabelValues(who, done).Inc()
	for _, s := range rec.Kill.Steps {
		m.killSteps.WithLabelValues(s.Name).Observe(s.Took.Seconds())
	}
}

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Health answers the probes: live is nil while tetherd's main loop runs, ready is nil while
// enforcement is in place (the programs are attached). Each error says why not.
type Health struct {
	Live, Ready func() error
}

// Serve serves /metrics, /healthz (liveness) and /readyz (readiness) at addr until the
// returned stop is called. The probes answer 200 "ok", or 503 and why.
func (m *Metrics) Serve(addr string, h Health, onErr func(error)) (func(), error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	mux.Handle("GET /healthz", probeHandler(h.Live))
	mux.Handle("GET /readyz", probeHandler(h.Ready))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && err != http.ErrServerClosed {
			onErr(err)
		}
	}()
	return func() { srv.Close() }, nil
}

func probeHandler(check func() error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if err := check(); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, err)
			return
		}
		fmt.Fprintln(w, "ok")
	}
}

type slotKey struct {
	slot       dataplane.Slot
	registered time.Time
	cgroup     uint64
}

type dataplaneCounts map[decisionKey]uint64

type decisionKey struct{ kind, verdict, id string }

// collector reads the daemon's state at each scrape. Decision counts come from the kernel's
// per-agent counters; they are accumulated per SPIFFE ID across agents that come and go, so the
// counter never goes down (what an agent counted between the last scrape and its removal is lost,
// and no more).
type collector struct {
	src Source

	mu        sync.Mutex
	seen      map[slotKey]dataplaneCounts
	totals    map[decisionKey]uint64
	statsErrs atomic.Uint64
	ids       idLabels
}

// The spiffe_id label of tether_decisions_total, as telemetry.spiffe_id_label says.
const (
	IDLabelFull        = "full"         // the SPIFFE ID
	IDLabelTrustDomain = "trust_domain" // spiffe://<trust domain> only
	IDLabelNone        = "none"         // "": one series per kind and verdict
)

// idLabels maps SPIFFE IDs to the values of the spiffe_id label: by mode, and at most max values
// (0: any number); the IDs past max share the value "other". Nodes of many short-lived identities
// bound their series so.
type idLabels struct {
	mode string
	max  int
	kept map[string]bool
}

func (l *idLabels) of(id string) string {
	switch l.mode {
	case IDLabelNone:
		return ""
	case IDLabelTrustDomain:
		if td, _, err := identity.Split(id); err == nil {
			id = "spiffe://" + td
		}
	}
	if l.max <= 0 || l.kept[id] {
		return id
	}
	if len(l.kept) >= l.max {
		return "other"
	}
	if l.kept == nil {
		l.kept = map[string]bool{}
	}
	l.kept[id] = true
	return id
}

// LabelSpiffeIDs sets how tether_decisions_total's spiffe_id label names an agent: mode (full,
// trust_domain or none) and at most max values (0: any number; past it, "other"). Set it before
// the first scrape.
func (m *Metrics) LabelSpiffeIDs(mode string, max int) {
	m.coll.mu.Lock()
	m.coll.ids = idLabels{mode: mode, max: max}
	m.coll.mu.Unlock()
}

var (
	descDecisions = prometheus.NewDesc("tether_decisions_total", "Decisions the kernel made for agents, by kind (connect, sendmsg, unix, exec, socket, sockopt; packet and terminate count drops and terminations of live sockets, not what passes), verdict and SPIFFE ID.", []string{"kind", "verdict", "spiffe_id"}, nil)
	descAgents    = prometheus.NewDesc("tether_agents", "Registered agents.", nil, nil)
	descKilled    = prometheus.NewDesc("tether_agents_killed", "Registered agents whose killed flag is set.", nil, nil)
	descTasks     = prometheus.NewDesc("tether_tasks", "Agents with an active task.", nil, nil)
	descFill      = prometheus.NewDesc("tether_map_fill_ratio", "How full a kernel map is: agents (slots), cgroups (bindings), procs (process lineage, an LRU), host_rules (tether_hosts: host rules and bulk-length ranges of all agents; when full they go into the tries), rules (the fullest agent rule set), ring_buffer (unread bytes).", []string{"map"}, nil)
	descEntries   = prometheus.NewDesc("tether_map_entries", "Entries in a kernel map, as in tether_map_fill_ratio (the ring buffer's unread bytes are tether_ring_buffer_unread_bytes).", []string{"map"}, nil)
	descRBUnread  = prometheus.NewDesc("tether_ring_buffer_unread_bytes", "Bytes of decision events in the kernel's ring buffer that tetherd has not read yet.", nil, nil)
	descMemory    = prometheus.NewDesc("tether_map_memory_bytes", "Kernel memory of each of tether's maps as the kernel charges it (memlock); rule_set_tries are all agents' rule-set tries together, total all of them.", []string{"map"}, nil)
	descMemSlot   = prometheus.NewDesc("tether_map_memory_per_agent_slot_bytes", "Kernel memory each agent slot costs whether used or not (the per-slot maps over their capacity); per-CPU maps count every possible CPU.", nil, nil)
	descMemRules  = prometheus.NewDesc("tether_map_memory_per_agent_rules_bytes", "Kernel memory of an agent's rule-set tries, on average over the agents that hold one.", nil, nil)
	descStatsOn   = prometheus.NewDesc("tether_bpf_stats_enabled", "1 when the kernel counts the programs' runs and run time (telemetry.bpf_stats).", nil, nil)
	descProgRuns  = prometheus.NewDesc("tether_bpf_program_runs_total", "Runs of each of tether's BPF programs, as the kernel counts them.", []string{"program"}, nil)
	descProgTime  = prometheus.NewDesc("tether_bpf_program_run_seconds_total", "Time spent in each of tether's BPF programs, as the kernel counts it.", []string{"program"}, nil)
	descProgMiss  = prometheus.NewDesc("tether_bpf_program_recursion_misses_total", "Runs of each program the kernel skipped because it was already running on the CPU.", []string{"program"}, nil)
	descStatsErr  = prometheus.NewDesc("tether_kernel_stats_errors_total", "Scrapes at which the programs' statistics or the maps' fill could not be read.", nil, nil)
	descEvals     = prometheus.NewDesc("tether_policy_evaluations_total", "Evaluations of the agents' grants.", nil, nil)
	descEvalErrs  = prometheus.NewDesc("tether_policy_evaluation_errors_total", "Evaluations that failed (the agent was granted nothing).", nil, nil)
	descRefused   = prometheus.NewDesc("tether_policy_revisions_refused_total", "Policy revisions refused (the last good one stayed).", nil, nil)
	descRefRules  = prometheus.NewDesc("tether_rules_refused_total", "Grant rules the compiler refused.", nil, nil)
	descInstalls  = prometheus.NewDesc("tether_rule_set_installs_total", "Rule sets installed into the kernel.", nil, nil)
	descMapFail   = prometheus.NewDesc("tether_map_write_failures_total", "Kernel map writes that failed.", nil, nil)
	descMapRetry  = prometheus.NewDesc("tether_map_write_retries_total", "Kernel map writes retried after a failure.", nil, nil)
	descRBLost    = prometheus.NewDesc("tether_ring_buffer_lost_events_total", "Decision events the kernel could not put in the ring buffer.", nil, nil)
	descEvRead    = prometheus.NewDesc("tether_events_read_total", "Decision events read from the ring buffer.", nil, nil)
	descEvWrite   = prometheus.NewDesc("tether_events_written_total", "Decision records handed to the sinks (the kernel's events and tetherd's own records).", nil, nil)
	descHTTPLog   = prometheus.NewDesc("tether_decision_log_http_records_total", "Decision records the HTTP sink delivered (result sent) or could not (dropped: queue full, refused, retries exhausted).", []string{"result"}, nil)
	descHTTPRetry = prometheus.NewDesc("tether_decision_log_http_retries_total", "Batches the HTTP sink sent again after a failure.", nil, nil)
	descOwnDrop   = prometheus.NewDesc("tether_records_dropped_total", "Records tetherd made itself (policy evaluations) dropped because their queue to the sinks was full.", nil, nil)
	descLostStart = prometheus.NewDesc("tether_records_lost_at_start_total", "Kernel records the previous tetherd had read and not written when it ended without flushing (killed), counted at this one's start.", nil, nil)
	descEvDecode  = prometheus.NewDesc("tether_events_decode_errors_total", "Ring buffer records that did not decode.", nil, nil)
	descSinkErrs  = prometheus.NewDesc("tether_decision_sink_errors_total", "Decision records a sink failed to write.", nil, nil)
	descSignalErr = prometheus.NewDesc("tether_exec_signal_errors_total", "Denied execs the kernel failed to signal (signal mode).", nil, nil)
	descIDLost    = prometheus.NewDesc("tether_identities_lost_total", "Agents whose identity was lost (SPIRE entry deleted, pod deleted).", nil, nil)
	descEscSent   = prometheus.NewDesc("tether_escalations_sent_total", "Alerts the escalation webhook accepted.", nil, nil)
	descEscDrop   = prometheus.NewDesc("tether_escalations_dropped_total", "Alerts dropped (queue full, or every retry failed).", nil, nil)
	descSweeps    = prometheus.NewDesc("tether_socket_sweeps_total", "Sweeps of agents' live sockets after their rule sets changed (or they were killed or removed).", nil, nil)
	descTermed    = prometheus.NewDesc("tether_sockets_terminated_total", "Live sockets terminated because their agent's rule set no longer allows their destination (or the agent was killed).", nil, nil)
	descSweepErr  = prometheus.NewDesc("tether_socket_sweep_errors_total", "Sweeps that failed and sockets a sweep could not terminate (their packets are still dropped).", nil, nil)
	descSweepLast = prometheus.NewDesc("tether_socket_sweep_last_duration_seconds", "How long the last sweep of live sockets took.", nil, nil)
	descPanics    = prometheus.NewDesc("tether_panics_recovered_total", "Inputs refused because tetherd panicked reading them (a bug: the input, a configuration, request, policy, kernel event or SPIRE answer, was refused instead of ending tetherd), by where.", []string{"boundary"}, nil)
	descSockStore = prometheus.NewDesc("tether_socket_storage_errors_total", "Agent sockets the kernel could not give storage to (no memory): judged per packet without it.", nil, nil)
)

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDecisions, descAgents, descKilled, descTasks, descFill, descEntries, descRBUnread, descMemory, descMemSlot, descMemRules,
		descStatsOn, descProgRuns, descProgTime, descProgMiss, descStatsErr, descEvals, descEvalErrs, descRefused,
		descRefRules, descInstalls, descMapFail, descMapRetry, descRBLost, descEvRead, descEvWrite, descOwnDrop, descLostStart, descHTTPLog, descHTTPRetry, descEvDecode, descSinkErrs, descSignalErr, descIDLost, descEscSent, descEscDrop,
		descSweeps, descTermed, descSweepErr, descSweepLast, descSockStore, descPanics} {
		ch <- d
	}
}

// kindOf folds the kernel's kinds into the metric's.
func kindOf(k string) string {
	switch k {
	case "connect4", "connect6":
		return "connect"
	case "sendmsg4", "sendmsg6":
		return "sendmsg"
	case "connect_unix", "sendmsg_unix":
		return "unix"
	}
	return k
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	e := emitter{ch}
	st := c.src.Stats()
	list := c.src.Agents()
	c.collectAgents(e, list)
	c.collectKernel(e, len(list))
	collectStatus(e, st)
}

// emitter sends constant metrics to a collection.
type emitter struct{ ch chan<- prometheus.Metric }

func (e emitter) counter(d *prometheus.Desc, v uint64, labels ...string) {
	e.ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
}

func (e emitter) gauge(d *prometheus.Desc, v float64, labels ...string) {
	e.ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

// collectAgents collects the agents, killed agents and tasks, and the decisions per agent.
func (c *collector) collectAgents(e emitter, list []agents.Agent) {
	c.mu.Lock()
	now := map[slotKey]dataplaneCounts{}
	killed, tasks := 0, 0
	for _, a := range list {
		if a.Killed {
			killed++
		}
		if a.Task != nil {
			tasks++
		}
		key := slotKey{a.Slot, a.Registered, a.CgroupID}
		now[key] = c.fold(key, a)
	}
	c.seen = now
	for k, n := range c.totals {
		e.counter(descDecisions, n, k.kind, k.verdict, k.id)
	}
	c.mu.Unlock()

	e.gauge(descAgents, float64(len(list)))
	e.gauge(descKilled, float64(killed))
	e.gauge(descTasks, float64(tasks))
}

// collectKernel collects the maps' fill and memory and the programs' statistics.
func (c *collector) collectKernel(e emitter, agentCount int) {
	ks := c.src.KernelStats()
	fill := map[string]dataplane.MapFill{"agents": {Entries: agentCount, Capacity: dataplane.MaxAgents}}
	for m, f := range ks.Fill {
		fill[m] = f
	}
	for m, f := range fill {
		e.gauge(descFill, f.Ratio(), m)
		if m == "ring_buffer" {
			e.gauge(descRBUnread, float64(f.Entries)) // bytes, not entries
			continue
		}
		e.gauge(descEntries, float64(f.Entries), m)
	}
	if mem := ks.Memory; mem != nil {
		for m, n := range mem.Maps {
			e.gauge(descMemory, float64(n), m)
		}
		e.gauge(descMemory, float64(mem.Total), "total")
		e.gauge(descMemSlot, float64(mem.PerSlot))
		e.gauge(descMemRules, float64(mem.PerAgentRules))
	}
	on := 0.0
	if ks.StatsEnabled {
		on = 1
	}
	e.gauge(descStatsOn, on)
	for p, st := range ks.Programs {
		e.counter(descProgRuns, st.Runs, p)
		e.ch <- prometheus.MustNewConstMetric(descProgTime, prometheus.CounterValue, st.Time.Seconds(), p)
		e.counter(descProgMiss, st.RecursionMisses, p)
	}
	if ks.Err != nil {
		c.statsErrs.Add(1)
	}
	e.counter(descStatsErr, c.statsErrs.Load())
}

// collectStatus collects the counters of tetherd's stages.
func collectStatus(e emitter, st Stats) {
	e.counter(descEvals, st.Registry.Evaluations)
	e.counter(descEvalErrs, st.Registry.EvalErrors)
	e.counter(descRefused, st.PolicyRefused)
	e.counter(descRefRules, st.Registry.RefusedRules)
	e.counter(descInstalls, st.Registry.Installs)
	e.counter(descMapFail, st.Registry.MapWriteFailures)
	e.counter(descMapRetry, st.Registry.MapWriteRetries)
	for b, n := range panics.Counts() {
		e.counter(descPanics, n, b)
	}
	e.counter(descRBLost, st.Kernel.RingBufferDrops)
	e.counter(descEvRead, st.Events.Read)
	e.counter(descEvWrite, st.Events.Written)
	e.counter(descOwnDrop, st.Events.RecordsDropped)
	e.counter(descLostStart, st.Events.LostAtStart)
	if h := st.DecisionLogHTTP; h != nil {
		e.counter(descHTTPLog, h.Sent, "sent")
		e.counter(descHTTPLog, h.Dropped, "dropped")
		e.counter(descHTTPRetry, h.Retries)
	}
	e.counter(descEvDecode, st.Events.DecodeErrors)
	e.counter(descSinkErrs, st.Events.SinkErrors)
	e.counter(descSignalErr, st.Kernel.SignalErrors)
	e.counter(descIDLost, st.IdentityLost)
	e.counter(descEscSent, st.EscalationSent)
	e.counter(descEscDrop, st.EscalationDropped)
	e.counter(descSweeps, st.Sweeps.Sweeps)
	e.counter(descTermed, st.Sweeps.Terminated)
	e.counter(descSweepErr, st.Sweeps.Errors)
	e.gauge(descSweepLast, st.Sweeps.Last.Seconds())
	e.counter(descSockStore, st.Kernel.SockStorageErrors)
}

// fold adds what a counted since it was last seen to the totals and returns its counts. Call
// with c.mu held.
func (c *collector) fold(key slotKey, a agents.Agent) dataplaneCounts {
	cur := dataplaneCounts{}
	id := c.ids.of(a.SpiffeID) // once per agent: it may parse the ID
	for k, n := range a.Counts {
		cur[decisionKey{kindOf(k.Kind.String()), k.Verdict.String(), id}] += n
	}
	prev := c.seen[key]
	for k, n := range cur {
		if n > prev[k] {
			c.totals[k] += n - prev[k]
		}
	}
	c.seen[key] = cur
	return cur
}
