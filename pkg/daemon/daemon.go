// Package daemon wires tetherd's stages together: it finds the cgroup2 hierarchy, loads the kernel
// side and attaches it at the agent parents, adopts the agents an earlier tetherd left pinned,
// compiles grants into their rule sets, pumps kernel decisions into the decision log, serves the
// control API, and keeps the kernel in step with the registry. It is the only package that knows
// every stage.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/config"
	"github.com/tether-sh/tether/pkg/containers"
	"github.com/tether-sh/tether/pkg/control"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/discovery"
	"github.com/tether-sh/tether/pkg/dnsproxy"
	"github.com/tether-sh/tether/pkg/escalation"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/fleet"
	"github.com/tether-sh/tether/pkg/guards"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/kernel"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
	"github.com/tether-sh/tether/pkg/telemetry"
)

// Daemon is a running tetherd.
type Daemon struct {
	log     *slog.Logger
	version string
	started time.Time

	cfg     atomic.Pointer[config.Loaded]
	access  atomic.Pointer[api.Policy]
	root    string   // cgroup2 mount
	parents []string // absolute agent parents
	launch  string   // absolute launch parent

	kern        *kernel.Kernel
	registry    *agents.Registry
	policy      *policy.Revisions
	responder   *policy.Responder
	control     *control.Agents
	compileOpts compile.Options
	pump        *events.Pump
	disc        *discovery.Discovery
	fleet       atomic.Pointer[fleet.Fleet] // the cluster's kills, on Kubernetes
	ownPodOnce  sync.Once
	ownPodPath  string
	killer      *killpath.Killer
	metrics     *telemetry.Metrics
	stream      *events.Stream
	reader      *kernel.EventReader
	httpLog     *events.HTTP // decision_log.http, or nil
	stepups     *stepup.Service
	bpfStats    bool // the kernel counts program runs for us
	webhook     *escalation.Webhook
	creds       *credentials.Lifecycle
	spire       *identity.SPIRE // the SPIRE agent's admin API, or nil
	serveErr    chan error      // the control API stopped serving
	recompile   chan struct{}   // a granted executable changed: compile the grants again soon
	guards      *guards.Guards
	roots       *containers.Roots // pod agents' container roots, where their exec rules are resolved
	dns         *dnsproxy.Proxy   // agents' DNS; nil: off

	ready    atomic.Bool  // the API serves and the programs are attached
	lastTick atomic.Int64 // unix ns of the main loop's last round
}

// stallLimit is how long the main loop may go without a round before /healthz fails.
const stallLimit = 30 * time.Second

// live is the liveness probe: starting (which can wait for the Kubernetes API server) counts
// as alive; after that, the main loop must have run within stallLimit.
func (d *Daemon) live() error {
	if !d.ready.Load() {
		return nil
	}
	if since := time.Since(time.Unix(0, d.lastTick.Load())); since > stallLimit {
		return fmt.Errorf("the main loop has not run for %s", since.Round(time.Second))
	}
	return nil
}

// readiness is the readiness probe: ready once the programs are attached and the API serves,
// and as long as every link is still pinned.
func (d *Daemon) readiness() error {
	if !d.ready.Load() {
		return errors.New("starting: the programs are not attached yet")
	}
	return d.kern.Attached()
}

// Options are what Run needs besides the configuration.
type Options struct {
	Version string
	Logger  *slog.Logger
	// Started, if set, is given the daemon once the API serves (for reloads).
	Started func(*Daemon)
}

// Run runs tetherd until ctx is done. Pinned enforcement stays in place when it returns.
//
// It starts tetherd in phases, each of which returns what closes it: the kernel side, the
// pipeline of decision records, the registry with what it acts through (policy, credentials,
// the kill path), identity discovery, and the sockets it serves. What a phase opened is closed,
// in reverse order, when Run returns.
func Run(ctx context.Context, cfg *config.Loaded, opts Options) error {
	d := &Daemon{log: opts.Logger, version: opts.Version, started: time.Now(),
		recompile: make(chan struct{}, 1), serveErr: make(chan error, 1)}
	d.cfg.Store(cfg)
	for _, w := range cfg.Warnings {
		d.log.Warn("configuration", "warning", w)
	}
	var opened closers
	defer opened.close()
	for _, phase := range []func(context.Context, *config.Loaded) (func(), error){
		d.startKernel, d.startPipeline, d.startRegistry, d.startIdentity, d.startServing,
	} {
		closer, err := phase(ctx, cfg)
		opened.add(closer)
		if err != nil {
			return err
		}
	}
	d.log.Info("tetherd ready", "socket", cfg.API.Socket, "agent_socket", cfg.API.AgentSocket, "agents", len(d.registry.List()), "config", cfg.Source)
	d.lastTick.Store(time.Now().UnixNano())
	d.ready.Store(true)
	if opts.Started != nil {
		opts.Started(d)
	}
	return d.loop(ctx)
}

// closers is what the phases opened, closed last first.
type closers []func()

// add adds f (nil: nothing).
func (c *closers) add(f func()) {
	if f != nil {
		*c = append(*c, f)
	}
}

func (c closers) close() {
	for i := len(c) - 1; i >= 0; i-- {
		c[i]()
	}
}

// startKernel finds the cgroups, loads the programs and attaches them at the agent parents.
func (d *Daemon) startKernel(_ context.Context, cfg *config.Loaded) (func(), error) {
	if err := d.findCgroups(cfg); err != nil {
		return nil, err
	}
	k, err := kernel.Open(kernel.Options{
		PinDir:             cfg.BPF.PinDir,
		RingBufferSize:     cfg.BPF.RingBufferBytes,
		AllowSample:        cfg.BPF.AllowSample,
		UnknownCgroupAllow: cfg.BPF.UnknownCgroup == "allow",
		Exec:               cfg.BPF.ExecMode,
		AllowRootAttach:    cfg.Cgroup.AllowRootAttach,
		Logger:             d.log,
	})
	if err != nil {
		return nil, err
	}
	d.kern = k
	closeKernel := func() { k.Close() }
	d.logFeatures()
	keep := map[uint64]bool{}
	for _, p := range d.parents {
		if err := k.AttachParent(p); err != nil {
			return closeKernel, err
		}
		id, _ := cgroups.ID(p)
		keep[id] = true
		d.log.Info("attached cgroup programs", "parent", p)
	}
	if gone, err := k.DetachStaleParents(keep); err != nil {
		d.log.Warn("detaching programs from cgroups no longer configured", "error", err)
	} else if len(gone) > 0 {
		d.log.Info("detached programs from cgroups no longer configured", "cgroup_ids", gone)
	}
	return closeKernel, nil
}

// startPipeline sets up what decision records go through: the kernel's ring buffer, the pump,
// and its sinks (the API's stream, the escalation webhook, the decision log file and collector),
// and the metrics.
func (d *Daemon) startPipeline(_ context.Context, cfg *config.Loaded) (func(), error) {
	var opened closers
	d.metrics = telemetry.New(d, d.version)
	d.metrics.LabelSpiffeIDs(cfg.Telemetry.SpiffeIDLabel, cfg.Telemetry.MaxSpiffeIDs)
	if cfg.Telemetry.BPFStats {
		if stats, err := kernel.EnableStats(); err != nil {
			d.log.Warn("BPF program statistics stay off (telemetry.bpf_stats)", "error", err)
		} else {
			d.bpfStats = true
			opened.add(func() { stats.Close() })
		}
	}
	sinks, closeSinks, err := d.sinks(cfg)
	opened.add(closeSinks)
	if err != nil {
		return opened.close, err
	}
	if d.reader, err = d.kern.NewEventReader(); err != nil {
		return opened.close, err
	}
	d.pump = events.NewPump(d.reader, attribution{d}, 8192, d.log, sinks...)
	d.pump.Node = config.NodeName(cfg.Env.Node)
	d.pump.SetMask(cfg.Mask)
	d.pump.Annotate = d.respond
	return opened.close, nil
}

// sinks opens where decision records go besides the pump's own counts.
func (d *Daemon) sinks(cfg *config.Loaded) ([]events.Sink, func(), error) {
	var opened closers
	sink, closeSink, err := decisionSink(cfg.DecisionLog)
	if err != nil {
		return nil, nil, err
	}
	opened.add(closeSink)
	d.stream = events.NewStream()
	sinks := []events.Sink{d.stream}
	if url := cfg.Telemetry.EscalationWebhook; url != "" {
		d.webhook = escalation.New(escalation.Options{URL: url, Format: cfg.Telemetry.EscalationFormat, ResolveAfter: cfg.Telemetry.EscalationResolveAfter,
			BurstDenials: cfg.Telemetry.DenyBurst, BurstWindow: cfg.Telemetry.DenyBurstWindow, Log: d.log})
		opened.add(d.webhook.Close)
		sinks = append(sinks, d.webhook)
	}
	if sink != nil {
		sinks = append(sinks, sink)
	}
	if h := cfg.DecisionLog.HTTP; h != nil {
		o := h.Options()
		o.Log = d.log
		if d.httpLog, err = events.NewHTTP(o); err != nil {
			return nil, opened.close, err
		}
		opened.add(func() {
			// What is still queued gets a few seconds to reach the collector; the rest is counted.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := d.httpLog.Close(ctx); err != nil {
				d.log.Warn("decision log collector", "error", err, "stats", d.httpLog.Stats())
			}
		})
		sinks = append(sinks, d.httpLog)
	}
	return sinks, opened.close, nil
}

// startRegistry sets up the registry and what it acts through (task credentials, the policy,
// the kill path), adopts the agents an earlier tetherd left pinned, and starts the pump.
func (d *Daemon) startRegistry(ctx context.Context, cfg *config.Loaded) (func(), error) {
	var opened closers
	if sp := cfg.Identity.SPIRE; sp != nil {
		spire, err := identity.DialSPIRE(sp.AdminSocket)
		if err != nil {
			return nil, err
		}
		d.spire = spire
		opened.add(func() { spire.Close() })
	}
	var err error
	if d.creds, err = newTaskCreds(cfg.Credentials, config.NodeName(cfg.Env.Node), d.spire, d.log); err != nil {
		return opened.close, err
	}
	if cfg.Credentials.Listen != "" {
		stop, err := d.creds.ServeRelyingParties(cfg.Credentials.Listen)
		if err != nil {
			return opened.close, err
		}
		opened.add(stop)
	}
	d.compileOpts = compile.Options{Files: compile.OS{}, Resolver: dnsResolver(cfg, d.log), UnixNever: cfg.SensitiveSockets(), Integrity: compile.NewIntegrity()}
	if cfg.API.AgentSocket != "" {
		d.compileOpts.UnixAlways = []string{cfg.API.AgentSocket}
	}
	d.guards = guards.New(d.compileOpts.Files, d.compileOpts.Integrity, d.compileSoon, d.metrics.ObserveGuard, d.log)
	if err := d.newPolicy(); err != nil {
		return opened.close, err
	}
	closeDNS, err := d.openDNSProxy(cfg)
	opened.add(closeDNS)
	if err != nil {
		return opened.close, err
	}
	d.newRegistry(cfg)
	opened.add(d.registry.Close)
	if err := d.startDNSProxy(cfg); err != nil {
		return opened.close, err
	}
	d.creds.Tasks = d.registry
	d.policy.Decider.Contexts = d.registry.ContextOf
	d.policy.Agents, d.policy.Compile = d.registry, d.compileOpts
	d.stepups = stepup.NewService(stepup.New(stepupKeep, nil), d.registry, d.policy.Decider.Stepup, d.pump.Emit, d.log)
	d.control = control.New(control.Options{Registry: d.registry, Credentials: d.creds, Stepup: d.policy.Decider.Stepup,
		Config: d.cfg.Load, Respond: d.respond, Emit: d.pump.Emit, Log: d.log})
	opened.add(d.control.Close)
	err = d.policy.Start(ctx)
	opened.add(d.policy.Stop)
	if err != nil {
		return opened.close, err
	}
	closeKiller, err := d.startKillPath(cfg)
	opened.add(closeKiller)
	if err != nil {
		return opened.close, err
	}
	d.adopt()
	d.setAccess(cfg)

	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		d.pump.Run(kernel.ErrClosed)
	}()
	opened.add(func() {
		d.reader.Close()
		<-pumped
	})
	d.killer.Continue(ctx)
	go d.guards.Run(ctx)
	return opened.close, nil
}

// adopt takes over the agents an earlier tetherd left pinned: their containers' roots first, so
// that their first compile has them, and what they learnt through the DNS proxy.
func (d *Daemon) adopt() {
	if infos, err := d.kern.Infos(); err == nil {
		d.roots.Preload(infos)
	}
	if err := d.registry.Adopt(); err != nil {
		d.log.Error("adopting pinned agents", "error", err)
	}
	if d.dns != nil {
		d.dns.Adopted(func(slot dataplane.Slot) (uint64, bool) {
			a, ok := d.registry.Get(slot)
			return a.CgroupID, ok
		})
	}
}

// newRegistry makes the agent registry, and the container roots a pod agent's exec rules are
// compiled in.
func (d *Daemon) newRegistry(cfg *config.Loaded) {
	d.registry = agents.New(agents.Options{
		Dataplane:    d.kern,
		Evaluator:    d.policy.Decider,
		Compile:      agents.CompileOn(d.compileOpts),
		Parents:      d.parents,
		LaunchParent: d.launch,
		TaskEnded:    d.creds.Ended,
		Unregistered: func(slot dataplane.Slot) {
			d.creds.Unregistered(slot)
			d.roots.Forget(slot)
			if d.dns != nil {
				d.dns.Forget(slot)
			}
		},
		ExecRoots: func(slot dataplane.Slot) []compile.Files { return d.roots.Files(slot) },
		Names:     d.learntNames(),
		Retiring:  func(a agents.Agent) { d.metrics.Retire(a) },
		Denied:    func(id string) bool { return d.killer != nil && d.killer.IsDenied(id) || d.fleet.Load().Denies(id) },
		UIDs:      launchUIDs(cfg),
		Logger:    d.log,
	})
	d.roots = containers.New(d.root, d.kern, d.registry, func(rec events.Decision) {
		d.responder.Annotate(&rec)
		d.pump.Emit(rec)
	}, d.log)
}

// startKillPath sets up the kill path, with SPIRE's server to delete the entries of a killed
// identity when configured.
func (d *Daemon) startKillPath(cfg *config.Loaded) (func(), error) {
	killOpts := killpath.Options{Registry: d.registry, Cgroup2: d.root, StateFile: cfg.Kill.StateFile, FreezeTimeout: cfg.Kill.FreezeTimeout,
		Emit: func(e events.Decision) {
			d.pump.Emit(e)
			d.metrics.ObserveKill(e)
		}, Log: d.log}
	var closer func()
	if sp := cfg.Identity.SPIRE; sp != nil && sp.ServerSocket != "" {
		server, err := identity.DialSPIREServer(sp.ServerSocket)
		if err != nil {
			return nil, err
		}
		closer = func() { server.Close() }
		killOpts.DeleteEntries = server.DeleteEntries
	}
	var err error
	d.killer, err = killpath.New(killOpts)
	return closer, err
}

// fleetSyncWait bounds how long pod discovery waits for the AgentKills to be listed (the API
// server answers the pod watch too; a missing CRD must not keep every pod unadmitted).
const fleetSyncWait = 30 * time.Second

// startIdentity starts identity discovery: static rules, SPIRE, the Kubernetes pod watch.
func (d *Daemon) startIdentity(ctx context.Context, cfg *config.Loaded) (func(), error) {
	var err error
	if d.disc, err = discovery.New(cfg.Identity, d.root, d.spire, d.registry, d.pump.Emit, d.log); err != nil {
		return nil, err
	}
	d.disc.OnPod = d.roots.Adopt
	var fl *fleet.Fleet
	if kc := cfg.Identity.Kubernetes; kc != nil {
		rc, err := identity.KubeConfig(kc.Kubeconfig)
		if err != nil {
			return nil, err
		}
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			return nil, err
		}
		// The DaemonSet passes its own pod's UID (metadata.uid): tetherd is no agent.
		if err := d.disc.WatchPods(client, config.NodeName(kc.NodeName), kc.TrustDomain, cfg.PodSelector, os.Getenv("POD_UID")); err != nil {
			return nil, err
		}
		dyn, err := dynamic.NewForConfig(rc)
		if err != nil {
			return nil, err
		}
		fl = fleet.New(dyn, config.NodeName(kc.NodeName), kc.TrustDomain, d.killer, d.registry, d.log)
		fl.PodName = d.disc.PodOf
		d.fleet.Store(fl)
	}
	if !d.disc.Enabled() {
		return nil, nil
	}
	dctx, stop := context.WithCancel(ctx)
	stopped := make(chan struct{})
	if fl != nil {
		go fl.Run(dctx)
	}
	go func() {
		defer close(stopped)
		if fl != nil {
			// The cluster's kills first: an identity an AgentKill names is denied before a pod
			// with it is admitted (a node that was down when the kill was issued).
			wctx, cancel := context.WithTimeout(dctx, fleetSyncWait)
			if !fl.WaitSynced(wctx) && dctx.Err() == nil {
				d.log.Error("the cluster's AgentKills are not listed; admitting pods without them", "waited", fleetSyncWait, "status", fl.Status())
			}
			cancel()
		}
		if err := d.disc.Run(dctx, d.parents); err != nil {
			d.log.Error("identity discovery stopped", "error", err)
		}
	}()
	return func() { stop(); <-stopped }, nil
}

// startServing serves the metrics, the control API and the agents' socket.
func (d *Daemon) startServing(_ context.Context, cfg *config.Loaded) (func(), error) {
	var opened closers
	if addr := cfg.Telemetry.MetricsAddress; addr != "" {
		stop, err := d.metrics.Serve(addr, telemetry.Health{Live: d.live, Ready: d.readiness},
			func(err error) { d.log.Error("serving metrics", "error", err) })
		if err != nil {
			return nil, err
		}
		opened.add(stop)
		d.log.Info("serving metrics", "address", addr)
	}
	l, err := api.Listen(cfg.API.Socket, cfg.API.Group)
	if err != nil {
		return opened.close, err
	}
	srv := api.NewServer(d.backend(), func() *api.Policy { return d.access.Load() }, d.log)
	go func() { d.serveErr <- srv.Serve(l) }()
	opened.add(func() { shutdown(srv, cfg.API.Socket) })
	if cfg.API.AgentSocket != "" {
		al, err := api.Listen(cfg.API.AgentSocket, "")
		if err != nil {
			return opened.close, err
		}
		if err := os.Chmod(cfg.API.AgentSocket, 0o666); err != nil { // whoever connects is checked by cgroup
			al.Close()
			return opened.close, fmt.Errorf("agent socket: %w", err)
		}
		asrv := api.NewAgentServer(d.backend(), d.agentOf, d.log)
		go asrv.Serve(al)
		opened.add(func() { shutdown(asrv, cfg.API.AgentSocket) })
	}
	return opened.close, nil
}

// shutdown stops a socket's server (giving requests in flight 5 s) and removes the socket.
func shutdown(srv interface{ Shutdown(context.Context) error }, socket string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
	os.Remove(socket)
}

// loop keeps the kernel in step with the registry until ctx is done or the API fails.
func (d *Daemon) loop(ctx context.Context) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	recheck := time.NewTicker(5 * time.Second)
	defer recheck.Stop()
	for {
		select {
		case <-ctx.Done():
			d.log.Info("tetherd stopping; pinned enforcement stays in place")
			return nil
		case err := <-d.serveErr:
			return fmt.Errorf("serving the API: %w", err)
		case <-tick.C:
			d.lastTick.Store(time.Now().UnixNano())
			d.registry.Reconcile()
			d.control.Sweep()
		case <-recheck.C:
			d.registry.Recompile(ctx)
		case <-d.recompile:
			d.registry.Recompile(ctx)
		}
	}
}

// compileSoon has the agents' grants compiled again soon (by the main loop; one request pending
// at most).
func (d *Daemon) compileSoon() {
	select {
	case d.recompile <- struct{}{}:
	default: // one is pending already
	}
}

// findCgroups resolves the cgroup2 mount and the agent parents, creating missing parents.
func (d *Daemon) findCgroups(cfg *config.Loaded) error {
	root := cfg.Cgroup.Root
	if root == "" {
		var err error
		if root, err = cgroups.Mount(); err != nil {
			return err
		}
	}
	d.root = root
	// Agents are found from their processes' /proc/PID/cgroup, which must name host cgroups.
	if err := cgroups.CheckNamespace(root); err != nil {
		return fmt.Errorf("%w (in a pod with hostPID, set TETHER_CGROUPNS=/proc/1/ns/cgroup)", err)
	}
	for _, p := range cfg.Cgroup.AgentParents {
		abs := config.CgroupPath(root, p)
		if !cfg.Cgroup.CreateParents {
			if _, err := cgroups.ID(abs); err != nil {
				return fmt.Errorf("agent parent %s must exist (cgroup.create_parents is off; on Kubernetes the pods' parent is kubepods.slice with the systemd cgroup driver, kubepods with cgroupfs): %w", abs, err)
			}
		}
		if _, err := cgroups.Create(abs); err != nil {
			return fmt.Errorf("agent parent %s: %w", abs, err)
		}
		d.parents = append(d.parents, abs)
	}
	d.launch = config.CgroupPath(root, cfg.Cgroup.LaunchParent)
	if _, err := cgroups.Create(d.launch); err != nil {
		return fmt.Errorf("launch parent %s: %w", d.launch, err)
	}
	return nil
}

func (d *Daemon) logFeatures() {
	f := d.kern.Features()
	for _, h := range f.Hooks {
		if h.Active {
			d.log.Info("hook active", "hook", h.Name, "section", h.Section)
		} else {
			d.log.Warn("hook inactive", "hook", h.Name, "section", h.Section, "reason", h.Reason)
		}
	}
	d.log.Info("exec enforcement", "mode", f.ExecMode, "reason", f.ExecReason)
	d.log.Info("live sockets", "terminate", f.SockDestroy, "reason", f.SockDestroyReason)
}

// openDNSProxy opens the DNS proxy's listeners when it is on (the registry compiles agents'
// fqdn rules from what it learns).
func (d *Daemon) openDNSProxy(cfg *config.Loaded) (func(), error) {
	pc := cfg.DNS.Proxy
	if !pc.Enabled {
		// A redirect an earlier tetherd left in the pinned configuration ends.
		return func() {}, d.kern.ClearDNSProxy()
	}
	server := cfg.DNS.Server
	if server == "" {
		var err error
		if server, err = compile.SystemDNS(); err != nil {
			return func() {}, fmt.Errorf("dns.proxy: no server to ask: %w (set dns.server)", err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(pc.StateFile), 0o700); err != nil {
		return func() {}, fmt.Errorf("dns.proxy.state_file: %w", err)
	}
	remote4, remote6, err := config.RemoteAddresses(pc.RemoteAddresses)
	if err != nil {
		return func() {}, err
	}
	listen := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	for _, a := range []netip.Addr{remote4, remote6} {
		if a.IsValid() {
			listen = append(listen, a)
		}
	}
	opts := dnsproxy.Options{Listen: listen, Port: pc.Port, Upstream: server, NXDomain: pc.Refuse == "nxdomain",
		MinTTL: pc.MinTTL, MaxTTL: pc.MaxTTL, Grace: pc.Grace, StateFile: pc.StateFile, Log: d.log,
		Emit: func(rec events.Decision) {
			d.disc.Annotate(&rec) // a pod agent's query names its pod
			d.responder.Annotate(&rec)
			d.pump.Emit(rec)
		}}
	if opts.Port == 0 {
		// The port an earlier tetherd's proxy had, where the kernel sends agents' DNS until this
		// one says otherwise: DNS works again as soon as this one listens.
		opts.Port = d.kern.DNSProxyPort()
	}
	p, err := dnsproxy.New(d.kern, opts)
	if err != nil && pc.Port == 0 && opts.Port != 0 {
		opts.Port = 0 // taken since: another one
		p, err = dnsproxy.New(d.kern, opts)
	}
	if err != nil {
		return func() {}, err
	}
	d.dns = p
	return p.Close, nil
}

// learntNames is the registry's Options.Names: what agents learnt through the DNS proxy (nil
// when it is off).
func (d *Daemon) learntNames() func(dataplane.Slot) compile.Names {
	if d.dns == nil {
		return nil
	}
	return d.dns.Names
}

// startDNSProxy answers agents' DNS and has the kernel send it there.
func (d *Daemon) startDNSProxy(cfg *config.Loaded) error {
	if d.dns == nil {
		return nil
	}
	d.dns.Serve(d.registry)
	remote4, remote6, err := config.RemoteAddresses(cfg.DNS.Proxy.RemoteAddresses) // checked by openDNSProxy
	if err != nil {
		return err
	}
	err = d.kern.SetDNSProxy(kernel.DNSProxy{IP4: netip.MustParseAddr("127.0.0.1"), IP6: netip.IPv6Loopback(), Port: d.dns.Port(),
		Remote4: remote4, Remote6: remote6, DenyDoT: cfg.DNS.Proxy.DenyDoT})
	if err != nil {
		return err
	}
	d.log.Info("DNS proxy answering agents' DNS", "port", d.dns.Port(), "upstream", cfg.DNS.Server, "deny_dot", cfg.DNS.Proxy.DenyDoT,
		"listen", d.dns.Stats().Listen)
	return nil
}

// dnsResolver resolves the fqdn rules of grants: the configured server, else the system's.
func dnsResolver(cfg *config.Loaded, log *slog.Logger) compile.Resolver {
	server := cfg.DNS.Server
	if server == "" {
		var err error
		if server, err = compile.SystemDNS(); err != nil {
			log.Warn("no DNS server: fqdn rules will be refused", "error", err)
			return nil
		}
	}
	return compile.NewDNS(server)
}

func (d *Daemon) setAccess(cfg *config.Loaded) {
	p := &api.Policy{AdminUIDs: cfg.API.AdminUIDs, AdminGIDs: cfg.API.AdminGIDs, Confined: d.confined}
	for _, r := range cfg.Launch {
		p.Launch = append(p.Launch, api.LaunchRule{IDs: r.IDs, UIDs: r.UIDs, GIDs: r.GIDs, Root: r.Root, Unconfined: r.Unconfined})
	}
	d.access.Store(p)
}

// Reload takes a new configuration: launch rules, admins, the environment and the policy
// apply at once (agents are evaluated again; a policy that is refused leaves the revision in
// force). Settings that need the kernel side reloaded are reported and wait for a restart.
func (d *Daemon) Reload(ctx context.Context, cfg *config.Loaded) error {
	old := d.cfg.Load()
	var restart []string
	if old.BPF != cfg.BPF {
		restart = append(restart, "bpf")
	}
	if fmt.Sprint(old.Cgroup) != fmt.Sprint(cfg.Cgroup) {
		restart = append(restart, "cgroup")
	}
	if old.API.Socket != cfg.API.Socket || old.API.Group != cfg.API.Group {
		restart = append(restart, "api.socket", "api.group")
	}
	if !reflect.DeepEqual(old.DecisionLog, cfg.DecisionLog) {
		restart = append(restart, "decision_log")
	}
	if (old.Policy.Bundle == nil) != (cfg.Policy.Bundle == nil) || fmt.Sprint(old.Policy.Bundle) != fmt.Sprint(cfg.Policy.Bundle) || !reflect.DeepEqual(old.DNS, cfg.DNS) {
		restart = append(restart, "policy.bundle", "dns")
	}
	if old.Confinement.UIDs != cfg.Confinement.UIDs {
		restart = append(restart, "confinement.uids")
	}
	if fmt.Sprint(old.Identity.Static, old.Identity.SPIRE) != fmt.Sprint(cfg.Identity.Static, cfg.Identity.SPIRE) {
		restart = append(restart, "identity.static", "identity.spire")
	}
	if len(restart) > 0 {
		d.log.Warn("configuration changes that take effect at the next restart", "settings", strings.Join(restart, ", "))
	}
	d.cfg.Store(cfg)
	d.setAccess(cfg)
	envChanged := fmt.Sprint(old.Env) != fmt.Sprint(cfg.Env) || old.Policy.Timezone != cfg.Policy.Timezone
	if envChanged {
		d.policy.Decider.SetEnv(policy.EnvOf(cfg), cfg.Location)
	}
	var errs []error
	if cfg.Policy.Bundle == nil {
		if _, err := d.policy.Reload(ctx, "configuration reloaded"); err != nil {
			errs = append(errs, err)
		}
	}
	if envChanged {
		errs = append(errs, d.registry.Refresh(ctx))
	}
	d.log.Info("configuration reloaded", "source", cfg.Source, "agents", len(d.registry.List()))
	return errors.Join(errs...)
}

// confined reports whether pid lives below an agent parent, and not in tetherd's own pod.
func (d *Daemon) confined(pid int32) bool {
	rel, err := cgroups.PathOf(int(pid))
	if err != nil {
		return true // cannot tell: refuse
	}
	abs := filepath.Join(d.root, rel)
	if own := d.ownPod(); own != "" && (abs == own || strings.HasPrefix(abs, own+"/")) {
		return false // kubectl exec ds/tether -- tetherctl
	}
	for _, p := range d.parents {
		if abs == p || strings.HasPrefix(abs, p+"/") {
			return true
		}
	}
	return false
}

// ownPod is the cgroup of the pod tetherd runs in (absolute), or "" outside Kubernetes. Under
// the agent parents like every pod, it is still never an agent, and its containers may use the
// control API.
func (d *Daemon) ownPod() string {
	d.ownPodOnce.Do(func() {
		if rel, err := cgroups.PathOf(os.Getpid()); err == nil {
			if _, pod, ok := identity.PodCgroup(filepath.Join(d.root, rel)); ok {
				d.ownPodPath = pod
			}
		}
	})
	return d.ownPodPath
}

// KernelStats implements telemetry.Source.
func (d *Daemon) KernelStats() telemetry.KernelStats {
	ks := telemetry.KernelStats{StatsEnabled: d.bpfStats, Fill: map[string]dataplane.MapFill{}}
	var errs []error
	progs, err := d.kern.ProgramStats()
	errs = append(errs, err)
	ks.Programs = progs
	fill, err := d.kern.Pressure()
	errs = append(errs, err)
	maps.Copy(ks.Fill, fill)
	mem, err := d.kern.MapMemory()
	errs = append(errs, err)
	if err == nil {
		ks.Memory = &mem
	}
	if d.reader != nil {
		ks.Fill["ring_buffer"] = d.reader.Fill()
	}
	ks.Err = errors.Join(errs...)
	return ks
}

// agentOf finds the agent whose cgroup holds process pid.
func (d *Daemon) agentOf(pid int32) (dataplane.Slot, bool) {
	rel, err := cgroups.PathOf(int(pid))
	if err != nil {
		return 0, false
	}
	return d.registry.SlotOfCgroup(filepath.Join(d.root, rel))
}

// launchUIDs is the range dynamic agent uids come from (confinement.uids).
func launchUIDs(cfg *config.Loaded) agents.UIDRange {
	return agents.UIDRange{First: cfg.LaunchUIDs.First, Last: cfg.LaunchUIDs.Last}
}

// attribution names the agents of the kernel's events from the registry (made after the pump).
type attribution struct{ d *Daemon }

func (a attribution) Identity(slot dataplane.Slot) (string, dataplane.Mode, bool) {
	return a.d.registry.Identity(slot)
}

func decisionSink(c config.DecisionLog) (events.Sink, func(), error) {
	switch c.Path {
	case "":
		return nil, func() {}, nil
	case "-":
		return events.NewJSONLines(os.Stdout), func() {}, nil
	}
	f, err := events.OpenFile(c.Path, c.MaxBytes, c.MaxFiles)
	if err != nil {
		return nil, nil, err
	}
	return f, func() { f.Close() }, nil
}

// backend is what the API serves, from the stages that do it.
func (d *Daemon) backend() api.Backend {
	return api.Backend{Status: d.status, Agents: d.control, Credentials: d.creds, Kills: d.killer, Stepups: d.stepups,
		Policy: d.policy, Events: d.stream}
}

// status is tetherd's status, from every stage.
func (d *Daemon) status() api.Status {
	cfg := d.cfg.Load()
	f := d.kern.Features()
	st := api.Status{
		Version: d.version, Started: d.started, ConfigSource: cfg.Source,
		PinDir: d.kern.PinDir(), Cgroup2: d.root, AgentParents: d.parents, LaunchParent: d.launch,
		ExecMode: string(f.ExecMode), ExecReason: f.ExecReason, ActiveLSMs: f.ActiveLSMs,
		Agents: len(d.registry.List()), Registry: d.registry.Stats(), Events: d.pump.Stats(), Policy: d.policy.Engine.Status(),
		Identity: d.disc.Status(), Containers: d.roots.Stats(), DNSProxy: d.dnsStats(), Escalation: d.escalationStatus(),
		Warnings: cfg.Warnings,
	}
	for _, h := range f.Hooks {
		st.Hooks = append(st.Hooks, api.Hook{Name: h.Name, Section: h.Section, Active: h.Active, Reason: h.Reason})
	}
	counts := d.Stats()
	st.Sockets = api.SocketStatus{Terminate: f.SockDestroy, Reason: f.SockDestroyReason, Sweeps: counts.Sweeps}
	st.Kernel, st.DecisionLogHTTP = counts.Kernel, counts.DecisionLogHTTP
	return st
}

// dnsStats is the DNS proxy's counts; nil when it is off.
func (d *Daemon) dnsStats() *dnsproxy.Stats {
	if d.dns == nil {
		return nil
	}
	s := d.dns.Stats()
	return &s
}

// Stats is what tetherd's stages count, for the metrics.
func (d *Daemon) Stats() telemetry.Stats {
	st := telemetry.Stats{Registry: d.registry.Stats(), PolicyRefused: d.policy.Engine.Status().Refused, Events: d.pump.Stats(),
		IdentityLost: d.disc.Status().Lost, Sweeps: d.kern.SweepStats()}
	esc := d.escalationStatus()
	st.EscalationSent, st.EscalationDropped = esc.Sent, esc.Dropped
	if c, err := d.kern.Counters(); err == nil {
		st.Kernel = c
	}
	if d.httpLog != nil {
		hs := d.httpLog.Stats()
		st.DecisionLogHTTP = &hs
	}
	return st
}

// Agents are the registry's agents, for the metrics (telemetry.Source).
func (d *Daemon) Agents() []agents.Agent { return d.registry.List() }

func (d *Daemon) escalationStatus() api.EscalationStatus {
	if d.webhook == nil {
		return api.EscalationStatus{}
	}
	sent, dropped, failed := d.webhook.Stats()
	return api.EscalationStatus{Sent: sent, Dropped: dropped, Failed: failed}
}
