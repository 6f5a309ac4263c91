// Package config reads tetherd's YAML configuration: where agents live (cgroups), how the kernel
// side is set up, who may use the control API and launch which identities, where the policy comes
// from and what it knows of the environment, and where decisions are logged. Every error names the
// file and line of the setting that is wrong.
package config

import (
	_ "embed"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/panics"
)

// DefaultYAML is the configuration tetherd runs with when given none.
//
//go:embed default.yaml
var DefaultYAML []byte

// Config is tetherd's configuration. What each identity may do is the policy's to say (see
// Policy); the configuration says where the policy comes from.
type Config struct {
	Cgroup      Cgroup       `json:"cgroup"`
	BPF         BPF          `json:"bpf"`
	API         API          `json:"api"`
	Launch      []LaunchRule `json:"launch"`
	Confinement Confinement  `json:"confinement"`
	Identity    Identity     `json:"identity"`
	Credentials Credentials  `json:"credentials"`
	Kill        Kill         `json:"kill"`
	Telemetry   Telemetry    `json:"telemetry"`
	Policy      Policy       `json:"policy"`
	Env         Env          `json:"env"`
	DNS         DNS          `json:"dns"`
	DecisionLog DecisionLog  `json:"decision_log"`
	Log         Log          `json:"log"`
}

// Policy says where the Rego policy (package tether) comes from: a directory, watched for
// changes, or an OPA bundle service; neither means the shipped policies, embedded in tetherd.
type Policy struct {
	Dir    string        `json:"dir"`
	Bundle *PolicyBundle `json:"bundle"`
	// DataDir, without dir or bundle, replaces the shipped policies' data (data.json or
	// data.yaml files, as in a policy directory) and keeps their Rego.
	DataDir string `json:"data_dir"`
	// Timezone is the zone of input.time (weekday, hour); an IANA name.
	Timezone string `json:"timezone"`
}

// PolicyBundle is an OPA bundle service (the standard bundle protocol).
type PolicyBundle struct {
	Service  string        `json:"service"`   // base URL
	Resource string        `json:"resource"`  // path of the bundle below it
	MinDelay time.Duration `json:"min_delay"` // "10s"
	MaxDelay time.Duration `json:"max_delay"`
	// Signature verification: bundles must be signed with this key.
	PublicKeyFile string `json:"public_key_file"`
	KeyID         string `json:"key_id"`
	Algorithm     string `json:"algorithm"`
	Scope         string `json:"scope"`
	// Credentials, TLS and Headers are OPA's service configuration, as in OPA's own
	// services.<name>: credentials of one kind (bearer, client_tls, oauth2, s3_signing,
	// gcp_metadata, azure_managed_identity), e.g. {bearer: {token_path: /run/secrets/token}};
	// tls, e.g. {ca_cert: /etc/tether/bundle-ca.pem}; headers sent with every request.
	Credentials map[string]any    `json:"credentials"`
	TLS         map[string]any    `json:"tls"`
	Headers     map[string]string `json:"headers"`
}

// bundleCredentials are the kinds of credentials OPA's REST client takes.
var bundleCredentials = []string{"bearer", "client_tls", "oauth2", "s3_signing", "gcp_metadata", "azure_managed_identity"}

// Env is what the policy knows of where agents run (input.env).
type Env struct {
	Node        string            `json:"node"` // empty: $NODE_NAME, else the host name
	Cluster     string            `json:"cluster"`
	Environment string            `json:"environment"`
	Labels      map[string]string `json:"labels"`
}

// DNS resolves the fqdn rules of grants.
type DNS struct {
	Server string `json:"server"` // host:port; empty: the first nameserver of /etc/resolv.conf
	// Proxy sends agents' DNS through tetherd, which answers only names their fqdn rules cover
	// and grants the addresses they were answered.
	Proxy DNSProxy `json:"proxy"`
}

// DNSProxy configures tetherd's DNS proxy (pkg/dnsproxy). The kernel sends the DNS (port 53, UDP
// and TCP, to any address) of agents in tetherd's network namespace to it on loopback, and that
// of agents in other network namespaces (pods) to its remote addresses; without one, theirs is
// judged by the egress rules.
type DNSProxy struct {
	Enabled bool `json:"enabled"`
	// Port of its listeners on 127.0.0.1 and ::1 (and the remote addresses); 0: one the kernel
	// picks.
	Port uint16 `json:"port"`
	// RemoteAddresses are addresses of tetherd's network namespace (at most one IPv4 and one
	// IPv6) that agents in other network namespaces reach: the proxy listens there too. Empty:
	// $TETHER_DNS_REMOTE_ADDRESSES (comma-separated; the chart sets the pod's addresses).
	RemoteAddresses []string `json:"remote_addresses"`
	// Refuse is the answer to a name no rule covers: "refused" (the default) or "nxdomain".
	Refuse string `json:"refuse"`
	// DenyDoT denies agents port 853 (DNS over TLS, which the proxy cannot read).
	DenyDoT bool `json:"deny_dot"`
	// MinTTL and MaxTTL bound how long an answer's addresses are granted (default 5s and 1h);
	// Grace is how long after that connections in progress keep them (default 10s).
	MinTTL time.Duration `json:"min_ttl"`
	MaxTTL time.Duration `json:"max_ttl"`
	Grace  time.Duration `json:"grace"`
	// StateFile keeps what agents were answered across restarts of tetherd.
	StateFile string `json:"state_file"`
}

// Cgroup says where agents live.
type Cgroup struct {
	// Root is the cgroup2 mount point; empty means the one /proc/self/mountinfo lists.
	Root string `json:"root"`
	// AgentParents are the cgroups (relative to Root, or absolute) under which agents live.
	// The cgroup programs attach here, so processes elsewhere are not hooked at all.
	AgentParents []string `json:"agent_parents"`
	// LaunchParent is where `tetherctl run` creates agent cgroups; it must be an agent parent
	// or below one.
	LaunchParent string `json:"launch_parent"`
	// AllowRootAttach permits an agent parent at the cgroup2 root (every process is hooked).
	AllowRootAttach bool `json:"allow_root_attach"`
	// CreateParents creates missing agent parents. Off where another owns them (the kubelet's
	// kubepods): a missing parent is then a wrong setting, and tetherd refuses to start.
	CreateParents bool `json:"create_parents"`
}

// BPF configures the kernel side.
type BPF struct {
	// PinDir holds the pinned maps and links; it survives tetherd restarts.
	PinDir string `json:"pin_dir"`
	// ExecMode is auto, lsm, signal or off.
	ExecMode dataplane.ExecMode `json:"exec_mode"`
	// RingBufferBytes is the event ring buffer size: a power of two, at least a page.
	RingBufferBytes uint32 `json:"ring_buffer_bytes"`
	// AllowSample logs one allow in every AllowSample allows (0: none). Denies are all logged.
	AllowSample uint32 `json:"allow_sample"`
	// UnknownCgroup is the network verdict (deny or allow) for processes under an agent parent
	// that belong to no agent.
	UnknownCgroup string `json:"unknown_cgroup"`
}

// API configures the control socket.
type API struct {
	// Socket is the unix socket path. Mode 0660 when Group is set, else 0600.
	Socket string `json:"socket"`
	// Group owns the socket, so its members can reach it (they still need a launch rule or
	// admin rights for each call).
	Group string `json:"group"`
	// AdminUIDs and AdminGIDs may call every verb. Root always may.
	AdminUIDs []uint32 `json:"admin_uids"`
	AdminGIDs []uint32 `json:"admin_gids"`
	// AgentSocket is the agent side of the API (mode 0666): only processes inside agents are
	// served, each as its own agent (its status, its task, step-up requests). Every agent may
	// connect to it; empty: none.
	AgentSocket string `json:"agent_socket"`
	// SensitiveSockets are unix sockets no grant may reach, besides the API socket and the SPIRE
	// sockets (which are always in the list).
	SensitiveSockets []string `json:"sensitive_sockets"`
}

// LaunchRule lets callers with one of UIDs or GIDs launch agents whose SPIFFE ID matches one
// of IDs (path.Match patterns).
type LaunchRule struct {
	IDs  []string `json:"ids"`
	UIDs []uint32 `json:"uids"`
	GIDs []uint32 `json:"gids"`
	// Root lets these callers launch these identities as uid 0 (tetherctl run --allow-root); no
	// caller may otherwise, admins included.
	Root bool `json:"root"`
	// Unconfined lets these callers launch these identities with the sandbox off (when the
	// policy's grants say sandbox: off, or with --keep-caps); no caller may otherwise.
	Unconfined bool `json:"unconfined"`
}

// Confinement configures what `tetherctl run` does to the agents it launches.
type Confinement struct {
	// UIDs is the range ("first-last") from which an agent launched without --user gets a uid
	// of its own, one no live agent, user or process has.
	UIDs string `json:"uids"`
	// Hide are more files and directories agents do not see: besides tether's sockets, key and
	// state, the SPIRE sockets and api.sensitive_sockets, which are always hidden.
	Hide []string `json:"hide"`
}

// UIDRange parses Confinement.UIDs.
func (c Confinement) UIDRange() (first, last uint32, err error) {
	lo, hi, ok := strings.Cut(c.UIDs, "-")
	a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 32)
	b, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 32)
	if !ok || err1 != nil || err2 != nil || a == 0 || b < a || b >= 1<<32-1 {
		return 0, 0, fmt.Errorf("%q: want first-last, two uids above 0 (2130706432-2130771967)", c.UIDs)
	}
	return uint32(a), uint32(b), nil
}

// Identity says how agents that are not launched through tetherctl get their SPIFFE ID: cgroups
// below an agent parent that get processes are matched against the static rules and, where
// SPIRE is configured for them, asked of SPIRE by PID. Until one answers, such a cgroup belongs
// to no agent (bpf.unknown_cgroup decides). Two answers that differ are a conflict: the cgroup
// gets no identity and the log says why.
type Identity struct {
	// TrustDomains, when set, are the only trust domains agents may have IDs in.
	TrustDomains []string     `json:"trust_domains"`
	Static       []StaticRule `json:"static"`
	SPIRE        *SPIRE       `json:"spire"`
	Kubernetes   *Kubernetes  `json:"kubernetes"`
}

// Kubernetes attributes pods: a pod's cgroup (all its containers) gets the SPIFFE ID of its
// service account, spiffe://<trust_domain>/ns/<namespace>/sa/<service account>.
type Kubernetes struct {
	TrustDomain string `json:"trust_domain"`
	// NodeName is this node's name; empty: $NODE_NAME (the DaemonSet sets it), else the host name.
	NodeName string `json:"node_name"`
	// Kubeconfig is a kubeconfig file; empty: the in-cluster service account.
	Kubeconfig string `json:"kubeconfig"`
	// PodSelector is a label selector (tether.dev/agent=true): only the pods it selects are
	// agents; the others stay unknown cgroups (bpf.unknown_cgroup). Empty: every pod.
	PodSelector string `json:"pod_selector"`
}

// StaticRule gives the agents it selects a SPIFFE ID; every selector set must match.
type StaticRule struct {
	ID     string  `json:"id"`
	Cgroup string  `json:"cgroup"` // pattern on the cgroup path below the cgroup2 root
	Unit   string  `json:"unit"`   // pattern on the systemd unit (foo.service, bar.scope)
	UID    *uint32 `json:"uid"`    // real uid of the cgroup's first process
}

// SPIRE is a SPIRE Agent whose Delegated Identity API tetherd asks.
type SPIRE struct {
	// AdminSocket is the agent's admin_socket_path.
	AdminSocket string `json:"admin_socket"`
	// ServerSocket is the SPIRE server's local admin socket (socket_path), optional: the kill
	// path deletes a killed agent's registration entries through it.
	ServerSocket string `json:"server_socket"`
	// WorkloadSocket is the agent's Workload API socket (socket_path), where tetherd gets its own
	// SVID; optional: status then shows tetherd's SPIFFE ID, which must be among the agent's
	// authorized_delegates.
	WorkloadSocket string `json:"workload_socket"`
	// Cgroups are patterns (below the cgroup2 root) of the cgroups whose identity comes from SPIRE.
	Cgroups []string `json:"cgroups"`
}

// Telemetry configures the metrics.
type Telemetry struct {
	// MetricsAddress, when set (host:port), serves Prometheus metrics at /metrics.
	MetricsAddress string `json:"metrics_address"`
	// EscalationWebhook, when set (http or https URL), receives high-severity decisions as
	// alerts: Alertmanager's URL (its API, /api/v2/alerts) or a webhook receiver's.
	EscalationWebhook string `json:"escalation_webhook"`
	// EscalationFormat is alertmanager (the default: Alertmanager's API, an array of alerts) or
	// webhook (Alertmanager's webhook payload, version 4, for webhook receivers).
	EscalationFormat string `json:"escalation_format"`
	// EscalationResolveAfter is when an alert ends (endsAt) unless sent again (default 1h).
	EscalationResolveAfter time.Duration `json:"escalation_resolve_after"`
	// DenyBurst is how many denials of one agent within DenyBurstWindow make an alert.
	DenyBurst       int           `json:"deny_burst"`
	DenyBurstWindow time.Duration `json:"deny_burst_window"`
	// SpiffeIDLabel is how tether_decisions_total's spiffe_id label names an agent: full (the
	// default), trust_domain or none; MaxSpiffeIDs bounds its values (0: any number; past it,
	// "other"), for nodes of many short-lived identities.
	SpiffeIDLabel string `json:"spiffe_id_label"`
	MaxSpiffeIDs  int    `json:"max_spiffe_ids"`
	// BPFStats turns on the kernel's run count and run time of BPF programs (BPF_ENABLE_STATS,
	// host-wide while tetherd runs; it costs two clock reads per program run) for the metrics.
	BPFStats bool `json:"bpf_stats"`
}

// Kill configures the kill path.
type Kill struct {
	// StateFile keeps unfinished kills and the denied SPIFFE IDs across restarts.
	StateFile string `json:"state_file"`
	// FreezeTimeout bounds the wait for a cgroup to report frozen.
	FreezeTimeout time.Duration `json:"freeze_timeout"`
}

// Credentials configures per-task credentials.
type Credentials struct {
	// Dir is where each agent's credential file goes; tetherd mounts a tmpfs there.
	Dir string `json:"dir"`
	// KeyFile is tether's ed25519 signing key (created when missing).
	KeyFile string `json:"key_file"`
	// TTL is the lifetime of one credential; heartbeats bring the next.
	TTL time.Duration `json:"ttl"`
	// Listen, when set (host:port), serves the public key set (/keys) and the revocation list
	// (/revoked) over HTTP for relying parties. Both are on the API socket too.
	Listen string `json:"listen"`
}

// DecisionLog says where decision events go as JSON lines.
type DecisionLog struct {
	// Path is a file, "-" for standard output, or empty for nowhere.
	Path string `json:"path"`
	// MaxBytes rotates the file when the next record would pass it (0: never); MaxFiles old
	// files are kept (path.1 is the newest).
	MaxBytes int64 `json:"max_bytes"`
	MaxFiles int   `json:"max_files"`
	// Evaluations logs every policy evaluation of an agent's grants (kind "policy"): its input
	// and result, the fields in Mask erased from the input.
	Evaluations bool `json:"evaluations"`
	// Mask lists JSON pointers into the input (/input/agent/labels/customer) erased from the
	// evaluation records before any sink sees them.
	Mask []string `json:"mask"`
	// HTTP, when set, also sends every record to a collector in batches.
	HTTP *DecisionLogHTTP `json:"http"`
}

// DecisionLogHTTP is the decision log's HTTP sink: batches of records POSTed as JSON arrays,
// retried with backoff; what it cannot deliver it counts. Zero numbers take the defaults.
type DecisionLogHTTP struct {
	URL           string        `json:"url"`
	BatchSize     int           `json:"batch_size"`     // default 500
	FlushInterval time.Duration `json:"flush_interval"` // default 1s
	Queue         int           `json:"queue"`          // records waiting, default 10000
	MaxRetries    int           `json:"max_retries"`    // default 5
	Gzip          bool          `json:"gzip"`
	// Format is json (a JSON array per batch, the default) or ndjson (one record per line).
	Format string `json:"format"`
}

// Options are the sink's options (without a logger).
func (h DecisionLogHTTP) Options() events.HTTPOptions {
	return events.HTTPOptions{URL: h.URL, BatchSize: h.BatchSize, FlushInterval: h.FlushInterval, Queue: h.Queue,
		MaxRetries: h.MaxRetries, Gzip: h.Gzip, NDJSON: h.Format == "ndjson"}
}

// Log configures tetherd's own log (standard error).
type Log struct {
	Level  string `json:"level"`  // debug, info, warn, error
	Format string `json:"format"` // text or json
}

// Defaults are the settings a configuration file starts from.
func Defaults() Config {
	return Config{
		Cgroup: Cgroup{AgentParents: []string{"tether"}, LaunchParent: "tether", CreateParents: true},
		BPF: BPF{
			PinDir:          "/sys/fs/bpf/tether",
			ExecMode:        "auto",
			RingBufferBytes: 4 << 20,
			AllowSample:     100,
			UnknownCgroup:   "deny",
		},
		API: API{Socket: "/run/tether/tether.sock", AdminUIDs: []uint32{0}, AgentSocket: "/run/tether/agent.sock",
			SensitiveSockets: []string{"/run/docker.sock", "/var/run/docker.sock", "/run/containerd/containerd.sock", "/run/crio/crio.sock"}},
		Policy:      Policy{Timezone: "UTC"},
		Telemetry:   Telemetry{BPFStats: true},
		DecisionLog: DecisionLog{Path: "-", MaxBytes: 100 << 20, MaxFiles: 5, Evaluations: true},
		Log:         Log{Level: "info", Format: "text"},
		Credentials: Credentials{Dir: "/run/tether/credentials", KeyFile: "/var/lib/tether/credentials.key", TTL: 5 * time.Minute},
		Kill:        Kill{StateFile: "/var/lib/tether/kill-state.json", FreezeTimeout: 5 * time.Second},
		DNS:         DNS{Proxy: DNSProxy{StateFile: "/var/lib/tether/dns-state.json"}},
		// 0x7f000000 and up: outside the ranges distributions give users, systemd's dynamic and
		// container uids and the usual subordinate ranges, and below 2^31.
		Confinement: Confinement{UIDs: "2130706432-2130771967"},
	}
}

// Loaded is a valid configuration and what checking it noticed.
type Loaded struct {
	Config
	Source   string // file name, or "embedded defaults"
	Warnings []string

	// What the checks parsed, for the daemon to use as it is.
	Location    *time.Location   // policy.timezone
	Mask        []events.Pointer // decision_log.mask
	PodSelector labels.Selector  // identity.kubernetes.pod_selector; nil without identity.kubernetes
	// LaunchUIDs are confinement.uids: the range dynamic agent uids come from.
	LaunchUIDs struct{ First, Last uint32 }
}

// Load reads the file at path, or the embedded defaults when path is empty.
func Load(path string) (*Loaded, error) {
	if path == "" {
		return Parse("embedded defaults", DefaultYAML)
	}
	b, err := readFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading configuration: %w", err)
	}
	return Parse(path, b)
}

// maxFileBytes bounds a configuration file: far above any real one, and a file that never ends
// (a link to /dev/zero) is refused instead of read until memory runs out.
const maxFileBytes = 4 << 20

// readFile reads a configuration file: a regular file of at most maxFileBytes. It opens without
// blocking, so a FIFO in its place is refused rather than waited on.
func readFile(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, st.Mode().Type())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxFileBytes {
		return nil, fmt.Errorf("%s: larger than %d MiB", path, maxFileBytes>>20)
	}
	return b, nil
}

// Parse decodes and checks a configuration. Unknown keys are errors.
func Parse(name string, b []byte) (*Loaded, error) {
	var l *Loaded
	// The YAML decoder has panicked on malformed input (a nil dereference in goccy/go-yaml's
	// slice decoding): such a file is refused like any other that does not load.
	err := panics.Run(boundary, func() (err error) {
		l, err = parse(name, b)
		return err
	})
	if pe := (*panics.Error)(nil); errors.As(err, &pe) {
		return nil, fmt.Errorf("%s: the file could not be decoded (the YAML decoder failed: %v); fix the file's syntax", name, pe.Value)
	}
	return l, err
}

// boundary counts the configuration files whose decoding panicked (see panics).
var boundary = panics.Declare("configuration")

func parse(name string, b []byte) (*Loaded, error) {
	// A file that does not parse is left to the decoder, which says where.
	file, _ := parser.ParseBytes(b, 0)
	if err := checkTags(file); err != nil {
		return nil, fmt.Errorf("%s%s", name, err)
	}
	cfg := Defaults()
	if err := yaml.UnmarshalWithOptions(b, &cfg, yaml.Strict(), yaml.UseJSONUnmarshaler()); err != nil {
		return nil, fmt.Errorf("%s: %s", name, strings.TrimSpace(yaml.FormatError(err, false, true)))
	}
	l := &Loaded{Config: cfg, Source: name}
	errs := l.check()
	if len(errs) == 0 {
		return l, nil
	}
	var out []error
	for _, e := range errs {
		out = append(out, fmt.Errorf("%s%s: %s: %s", name, lineOf(file, e.path), e.field, e.msg))
	}
	return nil, errors.Join(out...)
}

// standardTags are the YAML tags a configuration may carry: the core schema's, which say what a
// plain value is anyway.
var standardTags = map[string]bool{"!!str": true, "!!int": true, "!!float": true, "!!bool": true, "!!null": true,
	"!!seq": true, "!!map": true}

// checkTags refuses a file with any other tag before it is decoded: nothing in the configuration
// takes one, and the decoder panicked on a local tag (`agent_parents: !00`). It returns ":LINE:
// why", or nil. file is the parsed file (nil if it did not parse).
func checkTags(file *ast.File) error {
	if file == nil {
		return nil
	}
	var bad error
	for _, doc := range file.Docs {
		if doc == nil || doc.Body == nil {
			continue
		}
		ast.Walk(visitFunc(func(n ast.Node) bool {
			t, ok := n.(*ast.TagNode)
			if !ok || bad != nil || t.Start == nil || standardTags[t.Start.Value] {
				return bad == nil
			}
			bad = fmt.Errorf(":%d: the YAML tag %q: the configuration takes no tags; write the value plainly", t.Start.Position.Line, t.Start.Value)
			return false
		}), doc.Body)
	}
	return bad
}

// visitFunc is an ast.Visitor: it goes on into a node's children while it returns true.
type visitFunc func(ast.Node) bool

func (f visitFunc) Visit(n ast.Node) ast.Visitor {
	if n == nil || !f(n) {
		return nil
	}
	return f
}

type fieldError struct {
	path  string // YAML path: $.bpf.exec_mode
	field string // as the user reads it: bpf.exec_mode
	msg   string
}

// lineOf finds the line of a YAML path in the file, as ":N", or "" when it is not there (a
// default that is wrong in combination with something else).
func lineOf(file *ast.File, path string) string {
	if file == nil {
		return ""
	}
	p, err := yaml.PathString(path)
	if err != nil {
		return ""
	}
	node, err := p.FilterFile(file)
	if err != nil || node == nil || node.GetToken() == nil {
		return ""
	}
	return fmt.Sprintf(":%d", node.GetToken().Position.Line)
}

func (l *Loaded) check() []fieldError {
	var errs []fieldError
	bad := func(path, field, format string, args ...any) {
		errs = append(errs, fieldError{path, field, fmt.Sprintf(format, args...)})
	}
	for _, check := range []func(*Loaded, badFunc){
		checkCgroup, checkBPF, checkAPI, checkConfinement, checkIdentity, checkTelemetry, checkKill, checkPolicy, checkResolver,
	} {
		check(l, bad)
	}
	return errs
}

// badFunc records a field's problem: its JSON path, its name, what is wrong.
type badFunc func(path, field, format string, args ...any)

// checkCgroup checks the cgroups: root, agent parents, launch parent.
func checkCgroup(l *Loaded, bad badFunc) {
	c := &l.Config
	if c.Cgroup.Root != "" && !filepath.IsAbs(c.Cgroup.Root) {
		bad("$.cgroup.root", "cgroup.root", "%q: must be an absolute path", c.Cgroup.Root)
	}
	if len(c.Cgroup.AgentParents) == 0 {
		bad("$.cgroup.agent_parents", "cgroup.agent_parents", "at least one agent parent is needed")
	}
	for i, p := range c.Cgroup.AgentParents {
		if p == "" || strings.Contains("/"+p+"/", "/../") {
			bad(fmt.Sprintf("$.cgroup.agent_parents[%d]", i), "cgroup.agent_parents", "%q: a cgroup path without .. components", p)
		}
	}
	if c.Cgroup.LaunchParent != "" && !slices.ContainsFunc(c.Cgroup.AgentParents, func(p string) bool {
		return c.Cgroup.LaunchParent == p || strings.HasPrefix(c.Cgroup.LaunchParent, strings.TrimSuffix(p, "/")+"/")
	}) {
		bad("$.cgroup.launch_parent", "cgroup.launch_parent", "%q is not an agent parent or below one, so launched agents would not be hooked", c.Cgroup.LaunchParent)
	}
}

// checkBPF checks the kernel side.
func checkBPF(l *Loaded, bad badFunc) {
	c := &l.Config
	if !filepath.IsAbs(c.BPF.PinDir) {
		bad("$.bpf.pin_dir", "bpf.pin_dir", "%q: must be an absolute path", c.BPF.PinDir)
	}
	if _, err := dataplane.ParseExecMode(string(c.BPF.ExecMode)); err != nil {
		bad("$.bpf.exec_mode", "bpf.exec_mode", "%q: want auto, lsm, signal or off", c.BPF.ExecMode)
	}
	if n := c.BPF.RingBufferBytes; n < 4096 || n&(n-1) != 0 {
		bad("$.bpf.ring_buffer_bytes", "bpf.ring_buffer_bytes", "%d: want a power of two of at least 4096", n)
	}
	switch c.BPF.UnknownCgroup {
	case "deny", "allow":
	default:
		bad("$.bpf.unknown_cgroup", "bpf.unknown_cgroup", "%q: want deny or allow", c.BPF.UnknownCgroup)
	}
}

// checkAPI checks the sockets and who may launch.
func checkAPI(l *Loaded, bad badFunc) {
	c := &l.Config
	if s := c.API.AgentSocket; s != "" && (!filepath.IsAbs(s) || len(s) > 107 || s == c.API.Socket) {
		bad("$.api.agent_socket", "api.agent_socket", "%q: want an absolute path of at most 107 bytes, not the API socket", s)
	}
	for _, s := range c.API.SensitiveSockets {
		if !filepath.IsAbs(s) {
			bad("$.api.sensitive_sockets", "api.sensitive_sockets", "%q: must be an absolute path", s)
		}
	}
	if !filepath.IsAbs(c.API.Socket) {
		bad("$.api.socket", "api.socket", "%q: must be an absolute path", c.API.Socket)
	} else if len(c.API.Socket) > 107 {
		bad("$.api.socket", "api.socket", "%q: longer than a unix socket path can be (107 bytes)", c.API.Socket)
	}
	for i, r := range c.Launch {
		where := fmt.Sprintf("$.launch[%d]", i)
		if len(r.IDs) == 0 || len(r.UIDs)+len(r.GIDs) == 0 {
			bad(where, fmt.Sprintf("launch[%d]", i), "a launch rule needs ids and uids or gids")
		}
		for j, id := range r.IDs {
			if err := identity.ValidPattern(id); err != nil || !strings.HasPrefix(id, "spiffe://") {
				bad(fmt.Sprintf("%s.ids[%d]", where, j), fmt.Sprintf("launch[%d].ids", i), "%q: want a SPIFFE ID pattern (spiffe://trust-domain/path, * for a segment)", id)
			}
		}
	}
}

// checkConfinement checks the launcher's sandbox.
func checkConfinement(l *Loaded, bad badFunc) {
	c := &l.Config
	var err error
	if l.LaunchUIDs.First, l.LaunchUIDs.Last, err = c.Confinement.UIDRange(); err != nil {
		bad("$.confinement.uids", "confinement.uids", "%v", err)
	}
	for i, h := range c.Confinement.Hide {
		if !filepath.IsAbs(h) || filepath.Clean(h) == "/" {
			bad(fmt.Sprintf("$.confinement.hide[%d]", i), "confinement.hide", "%q: want an absolute path other than /", h)
		}
	}
}

// checkIdentity checks identity discovery.
func checkIdentity(l *Loaded, bad badFunc) {
	c := &l.Config
	for i, td := range c.Identity.TrustDomains {
		if _, err := identity.Parse("spiffe://" + td); err != nil || strings.Contains(td, "/") {
			bad(fmt.Sprintf("$.identity.trust_domains[%d]", i), "identity.trust_domains", "%q: want a trust domain name (example.org)", td)
		}
	}
	for i, r := range c.Identity.Static {
		where, field := fmt.Sprintf("$.identity.static[%d]", i), fmt.Sprintf("identity.static[%d]", i)
		if _, err := identity.Parse(r.ID); err != nil {
			bad(where+".id", field+".id", "%v", err)
		} else if err := c.Identity.CheckTrustDomain(r.ID); err != nil {
			bad(where+".id", field+".id", "%v", err)
		}
		if r.Cgroup == "" && r.Unit == "" && r.UID == nil {
			bad(where, field, "a static rule needs a cgroup, unit or uid selector")
		}
		for _, p := range []struct{ key, pat string }{{"cgroup", r.Cgroup}, {"unit", r.Unit}} {
			if err := identity.ValidPattern(p.pat); err != nil {
				bad(where+"."+p.key, field+"."+p.key, "%v", err)
			}
		}
	}
	if k := c.Identity.Kubernetes; k != nil {
		if _, err := identity.Parse("spiffe://" + k.TrustDomain); err != nil || k.TrustDomain == "" || strings.Contains(k.TrustDomain, "/") {
			bad("$.identity.kubernetes.trust_domain", "identity.kubernetes.trust_domain", "%q: want a trust domain name (cluster.local)", k.TrustDomain)
		} else if err := c.Identity.CheckTrustDomain("spiffe://" + k.TrustDomain); err != nil {
			bad("$.identity.kubernetes.trust_domain", "identity.kubernetes.trust_domain", "%v", err)
		}
		var err error
		if l.PodSelector, err = labels.Parse(k.PodSelector); err != nil {
			bad("$.identity.kubernetes.pod_selector", "identity.kubernetes.pod_selector", "%q: %v", k.PodSelector, err)
		}
	}
	if sp := c.Identity.SPIRE; sp != nil {
		if !filepath.IsAbs(sp.AdminSocket) || len(sp.AdminSocket) > 107 {
			bad("$.identity.spire.admin_socket", "identity.spire.admin_socket", "%q: want an absolute unix socket path (at most 107 bytes)", sp.AdminSocket)
		}
		if sp.ServerSocket != "" && (!filepath.IsAbs(sp.ServerSocket) || len(sp.ServerSocket) > 107) {
			bad("$.identity.spire.server_socket", "identity.spire.server_socket", "%q: want an absolute unix socket path (at most 107 bytes)", sp.ServerSocket)
		}
		if sp.WorkloadSocket != "" && (!filepath.IsAbs(sp.WorkloadSocket) || len(sp.WorkloadSocket) > 107) {
			bad("$.identity.spire.workload_socket", "identity.spire.workload_socket", "%q: want an absolute unix socket path (at most 107 bytes)", sp.WorkloadSocket)
		}
		if len(sp.Cgroups) == 0 {
			bad("$.identity.spire.cgroups", "identity.spire.cgroups", "name the cgroups (patterns) whose identity SPIRE gives")
		}
		for j, p := range sp.Cgroups {
			if err := identity.ValidPattern(p); err != nil || p == "" {
				bad(fmt.Sprintf("$.identity.spire.cgroups[%d]", j), "identity.spire.cgroups", "%q: want a cgroup path pattern", p)
			}
		}
	}
}

// checkTelemetry checks alerts, the decision log and metrics.
func checkTelemetry(l *Loaded, bad badFunc) {
	c := &l.Config
	if u := c.Telemetry.EscalationWebhook; u != "" {
		if pu, err := url.Parse(u); err != nil || (pu.Scheme != "http" && pu.Scheme != "https") || pu.Host == "" {
			bad("$.telemetry.escalation_webhook", "telemetry.escalation_webhook", "%q: want an http or https URL", u)
		}
	}
	switch c.Telemetry.SpiffeIDLabel {
	case "", "full", "trust_domain", "none":
	default:
		bad("$.telemetry.spiffe_id_label", "telemetry.spiffe_id_label", "%q: want full, trust_domain or none", c.Telemetry.SpiffeIDLabel)
	}
	if c.Telemetry.MaxSpiffeIDs < 0 {
		bad("$.telemetry.max_spiffe_ids", "telemetry.max_spiffe_ids", "%d: must not be negative", c.Telemetry.MaxSpiffeIDs)
	}
	switch c.Telemetry.EscalationFormat {
	case "", "alertmanager", "webhook":
	default:
		bad("$.telemetry.escalation_format", "telemetry.escalation_format", "%q: want alertmanager or webhook", c.Telemetry.EscalationFormat)
	}
	if r := c.Telemetry.EscalationResolveAfter; r != 0 && (r < time.Minute || r > 7*24*time.Hour) {
		bad("$.telemetry.escalation_resolve_after", "telemetry.escalation_resolve_after", "%s: want 1m to 168h", r)
	}
	if c.Telemetry.DenyBurst < 0 || c.Telemetry.DenyBurstWindow < 0 {
		bad("$.telemetry", "telemetry.deny_burst", "deny_burst and deny_burst_window must not be negative")
	}
	if c.DecisionLog.MaxBytes < 0 || c.DecisionLog.MaxFiles < 1 {
		bad("$.decision_log", "decision_log.max_bytes", "max_bytes must not be negative and max_files must be at least 1")
	}
	if h := c.DecisionLog.HTTP; h != nil {
		if _, err := h.Options().Check(); err != nil {
			bad("$.decision_log.http", "decision_log.http", "%v", err)
		}
		if h.Format != "" && h.Format != "json" && h.Format != "ndjson" {
			bad("$.decision_log.http.format", "decision_log.http.format", "%q: want json or ndjson", h.Format)
		}
	}
	var err error
	if l.Mask, err = events.ParseMask(c.DecisionLog.Mask); err != nil {
		bad("$.decision_log.mask", "decision_log.mask", "%v", err)
	}
	if a := c.Telemetry.MetricsAddress; a != "" {
		if _, _, err := net.SplitHostPort(a); err != nil {
			bad("$.telemetry.metrics_address", "telemetry.metrics_address", "%q: want host:port", a)
		}
	}
}

// checkKill checks the kill path and task credentials.
func checkKill(l *Loaded, bad badFunc) {
	c := &l.Config
	if !filepath.IsAbs(c.Kill.StateFile) {
		bad("$.kill.state_file", "kill.state_file", "%q: must be an absolute path", c.Kill.StateFile)
	}
	if c.Kill.FreezeTimeout < 10*time.Millisecond || c.Kill.FreezeTimeout > time.Minute {
		bad("$.kill.freeze_timeout", "kill.freeze_timeout", "%s: want 10ms to 1m", c.Kill.FreezeTimeout)
	}
	if !filepath.IsAbs(c.Credentials.Dir) {
		bad("$.credentials.dir", "credentials.dir", "%q: must be an absolute path", c.Credentials.Dir)
	}
	if !filepath.IsAbs(c.Credentials.KeyFile) {
		bad("$.credentials.key_file", "credentials.key_file", "%q: must be an absolute path", c.Credentials.KeyFile)
	}
	if c.Credentials.TTL < 10*time.Second || c.Credentials.TTL > time.Hour {
		bad("$.credentials.ttl", "credentials.ttl", "%s: want 10s to 1h", c.Credentials.TTL)
	}
	if l := c.Credentials.Listen; l != "" {
		if _, _, err := net.SplitHostPort(l); err != nil {
			bad("$.credentials.listen", "credentials.listen", "%q: want host:port", l)
		}
	}
}

// checkPolicy checks the policy source and its clock.
func checkPolicy(l *Loaded, bad badFunc) {
	c := &l.Config
	if c.Policy.Dir != "" && c.Policy.Bundle != nil {
		bad("$.policy", "policy", "give a dir or a bundle, not both")
	}
	if c.Policy.Dir != "" && !filepath.IsAbs(c.Policy.Dir) {
		bad("$.policy.dir", "policy.dir", "%q: must be an absolute path", c.Policy.Dir)
	}
	if d := c.Policy.DataDir; d != "" {
		switch {
		case c.Policy.Dir != "" || c.Policy.Bundle != nil:
			bad("$.policy.data_dir", "policy.data_dir", "replaces the shipped policies' data: not with a dir or a bundle (put the data there)")
		case !filepath.IsAbs(d):
			bad("$.policy.data_dir", "policy.data_dir", "%q: must be an absolute path", d)
		}
	}
	if b := c.Policy.Bundle; b != nil {
		if u, err := url.Parse(b.Service); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("$.policy.bundle.service", "policy.bundle.service", "%q: want an http or https URL", b.Service)
		}
		if b.Resource == "" {
			bad("$.policy.bundle.resource", "policy.bundle.resource", "the bundle's path is required")
		}
		if b.MaxDelay < b.MinDelay {
			bad("$.policy.bundle.max_delay", "policy.bundle.max_delay", "shorter than min_delay")
		}
		if len(b.Credentials) > 1 {
			bad("$.policy.bundle.credentials", "policy.bundle.credentials", "give one kind of credentials, not %d", len(b.Credentials))
		}
		for kind := range b.Credentials {
			if !slices.Contains(bundleCredentials, kind) {
				bad("$.policy.bundle.credentials", "policy.bundle.credentials", "%q: want one of %s (OPA's)", kind, strings.Join(bundleCredentials, ", "))
			}
		}
		if b.PublicKeyFile != "" {
			if _, err := os.ReadFile(b.PublicKeyFile); err != nil {
				bad("$.policy.bundle.public_key_file", "policy.bundle.public_key_file", "%v", err)
			}
			if b.KeyID == "" {
				bad("$.policy.bundle.key_id", "policy.bundle.key_id", "a key id is required with a public key")
			}
		}
	}
	var err error
	if l.Location, err = time.LoadLocation(c.Policy.Timezone); err != nil {
		bad("$.policy.timezone", "policy.timezone", "%q: %v", c.Policy.Timezone, err)
	}
}

// checkResolver checks the DNS resolver and the log.
func checkResolver(l *Loaded, bad badFunc) {
	c := &l.Config
	if c.DNS.Server != "" {
		if _, _, err := net.SplitHostPort(c.DNS.Server); err != nil {
			bad("$.dns.server", "dns.server", "%q: want host:port", c.DNS.Server)
		}
	}
	p := c.DNS.Proxy
	switch p.Refuse {
	case "", "refused", "nxdomain":
	default:
		bad("$.dns.proxy.refuse", "dns.proxy.refuse", "%q: want refused or nxdomain", p.Refuse)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"min_ttl", p.MinTTL}, {"max_ttl", p.MaxTTL}, {"grace", p.Grace}} {
		if d.v != 0 && (d.v < time.Second || d.v > 24*time.Hour) {
			bad("$.dns.proxy."+d.name, "dns.proxy."+d.name, "%s: want 1s to 24h", d.v)
		}
	}
	if p.Enabled && !filepath.IsAbs(p.StateFile) {
		bad("$.dns.proxy.state_file", "dns.proxy.state_file", "%q: must be an absolute path", p.StateFile)
	}
	if _, _, err := RemoteAddresses(p.RemoteAddresses); err != nil {
		bad("$.dns.proxy.remote_addresses", "dns.proxy.remote_addresses", "%v", err)
	}
	if p.MinTTL != 0 && p.MaxTTL != 0 && p.MinTTL > p.MaxTTL {
		bad("$.dns.proxy.min_ttl", "dns.proxy.min_ttl", "%s is above max_ttl %s", p.MinTTL, p.MaxTTL)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("$.log.level", "log.level", "%q: want debug, info, warn or error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("$.log.format", "log.format", "%q: want text or json", c.Log.Format)
	}
}

// CgroupPath resolves a configured cgroup (relative to root, or absolute) to a directory.
func CgroupPath(root, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(root, p)
}

// CheckTrustDomain refuses id when it is no SPIFFE ID, or when trust domains are configured and
// its trust domain is not one of them.
func (c Identity) CheckTrustDomain(id string) error {
	td, _, err := identity.Split(id)
	if err != nil {
		return err
	}
	if len(c.TrustDomains) == 0 {
		return nil
	}
	if !slices.Contains(c.TrustDomains, td) {
		return fmt.Errorf("SPIFFE ID %s: trust domain %q is not configured (identity.trust_domains: %s)", id, td, strings.Join(c.TrustDomains, ", "))
	}
	return nil
}
