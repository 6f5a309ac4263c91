// Package differential checks the kernel against the policy. For generated agent contexts and
// requests, the verdict the kernel gives a real connect, exec or unix socket connect must equal
// the reference decision data.tether.allow of the same policy for the same input.
//
// The policy is the shipped Rego with the shipped data, moved onto this test's files: every tool
// is a copy of true in the test's directory (git is a copy of the test binary, so a
// probe can run as git), every network also gets a loopback twin (TCP is only ever sent to
// loopback; UDP connects, which send nothing, go anywhere), and the profiles gain unix sockets
// and one more profile with port ranges, IPv6 and an explicit binary rule.
//
// The chain under test is the daemon's: registry -> policy -> compile -> kernel maps; only the
// clock (and so the time the policy sees) is the test's. DNS queries go the daemon's way too: the
// kernel sends them to tether's DNS proxy (pkg/dnsproxy), which answers or refuses them by the
// registry's grants, asking a test server on loopback (internal/dnstest).
package differential

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/dnstest"
	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/dnsproxy"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/kernel"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/policies"
)

func TestMain(m *testing.M) { privtest.Main(m) }

// samples is how many (context, request) pairs to check: TETHER_DIFF_SAMPLES, default 10,000.
func samples(t *testing.T) int {
	n := 10000
	if s := os.Getenv("TETHER_DIFF_SAMPLES"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 100 {
			t.Fatalf("TETHER_DIFF_SAMPLES=%q: want a number of at least 100", s)
		}
		n = v
	}
	return n
}

func TestPrivilegedKernelAgreesWithPolicy(t *testing.T) {
	privtest.Gate(t)
	want := samples(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("TETHER_DIFF_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (TETHER_DIFF_SEED=%d repeats this run)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	ctx := context.Background()

	w := newWorld(t)
	rev := w.revision(t)

	parent := privtest.Cgroup(t)
	k, err := kernel.Open(kernel.Options{PinDir: privtest.PinDir(t), Logger: quiet()})
	if err != nil {
		t.Fatalf("%+v", err)
	}
	t.Cleanup(func() { k.Close() })
	if err := k.AttachParent(parent); err != nil {
		t.Fatal(err)
	}
	t.Logf("exec enforcement: %s (%s)", k.Features().ExecMode, k.Features().ExecReason)
	if want := os.Getenv("TETHER_EXPECT_EXEC_MODE"); want != "" && string(k.Features().ExecMode) != want {
		t.Fatalf("exec mode %s, want %s", k.Features().ExecMode, want)
	}

	clk := &clock{now: time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)}
	ev := &evaluator{rev: rev, clock: clk, bootstrap: true, bootExec: []string{w.self, w.git}}
	proxy := startDNSProxy(t, k)
	reg := agents.New(agents.Options{
		Dataplane: testClockGrants{k, clk}, Evaluator: ev, Compile: agents.CompileOn(compile.Options{Files: compile.OS{}, Integrity: compile.NewIntegrity()}),
		Parents: []string{parent}, LaunchParent: parent, Now: clk.Now, Logger: quiet(), Names: proxy.Names,
	})
	t.Cleanup(reg.Close)
	proxy.Serve(reg)

	// Each agent is registered with grants that let its probes start (as the test binary and as
	// git), so the kernel records which binary each probe runs; then the policy takes over.
	var as []*agent
	for i, id := range agentIDs {
		path, _ := privtest.SubCgroup(t, parent, fmt.Sprintf("agent%d", i))
		a, err := reg.Register(agents.Registration{SpiffeID: id.spiffe, Cgroup: path, Labels: id.labels})
		if err != nil {
			t.Fatal(err)
		}
		ag := &agent{slot: a.Slot, id: id.spiffe}
		ag.plain = startProbe(t, path, w.self)
		ag.git = startProbe(t, path, w.git)
		as = append(as, ag)
	}
	ev.setBootstrap(false)

	var st stats
	var disagreements []string
	rounds := 0
	for st.total < want {
		rounds++
		w.nextContext(t, rng, reg, clk, ev, as)
		if err := reg.Refresh(ctx); err != nil {
			t.Fatalf("round %d: refresh: %v", rounds, err)
		}
		for _, a := range as {
			w.sampleAgent(t, rng, reg, ev, rev, a, rounds, &st, &disagreements)
		}
	}
	t.Logf("%d samples in %d rounds of %d agents: %s", st.total, rounds, len(as), st)
	for i, d := range disagreements {
		if i == 20 {
			t.Errorf("... and %d more", len(disagreements)-20)
			break
		}
		t.Error(d)
	}
	if len(disagreements) > 0 {
		t.Fatalf("%d of %d samples disagree", len(disagreements), st.total)
	}
	checkBothVerdicts(t, st, want)
}

// startDNSProxy has k send agents' DNS to a DNS proxy asking a test server. The server answers
// every name NXDOMAIN: what is checked is which queries the proxy answers and which it refuses.
// An answer's addresses would become rules whose expiry the compiler reckons on the machine's
// clock, while this test's registry runs days away from it; test/e2e's TestPrivilegedDNSProxy
// checks those.
func startDNSProxy(t *testing.T, k *kernel.Kernel) *dnsproxy.Proxy {
	t.Helper()
	up := dnstest.Start(t)
	p, err := dnsproxy.New(k, dnsproxy.Options{Upstream: up.Addr, Log: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	if err := k.SetDNSProxy(kernel.DNSProxy{IP4: netip.MustParseAddr("127.0.0.1"), IP6: netip.IPv6Loopback(), Port: p.Port()}); err != nil {
		t.Fatal(err)
	}
	return p
}

// dnsNames are the names the DNS requests ask: those the test profile's fqdn rules and the shipped
// coding profile's services name, below and beside them, and others.
var dnsNames = []string{"api.github.com", "gist.github.com", "api.diff.test", "API.diff.test", "x.api.diff.test", "diff.test", "a.cdn.diff.test", "a.b.cdn.diff.test",
	"cdn.diff.test", "cdn.diff.test.evil.example", "evil.example", "github.com", "c2VjcmV0.exfil.example"}

// checkBothVerdicts: a generator that only ever produced one verdict would prove nothing; each
// kind needs at least min(100, want/100) of each.
func checkBothVerdicts(t *testing.T, st stats, want int) {
	t.Helper()
	least := min(100, want/100)
	for kind, v := range st.by {
		if v[0] < least || v[1] < least {
			t.Errorf("%s: only %d denied and %d allowed samples (want at least %d of each)", kind, v[0], v[1], least)
		}
	}
}

// sampleAgent checks that the registry installed agent a's grants, then asks the kernel (a's
// probes) and the policy perRound requests each, counting the samples and the disagreements.
func (w *world) sampleAgent(t *testing.T, rng *rand.Rand, reg *agents.Registry, ev *evaluator, rev *policy.Revision, a *agent, rounds int,
	st *stats, disagreements *[]string) {
	t.Helper()
	ctx := context.Background()
	view, _ := reg.Get(a.slot)
	// The rule pinned to another content than its file's is refused, as it must be.
	refused := slices.DeleteFunc(slices.Clone(view.Refused), func(r string) bool { return strings.Contains(r, w.wrongDigest) })
	if view.Error != "" || len(refused) > 0 || !view.Synced {
		t.Fatalf("round %d, %s: the registry did not install the grants: error %q, refused %v, synced %v",
			rounds, a.id, view.Error, view.Refused, view.Synced)
	}
	c, _ := reg.ContextOf(a.slot)
	in := ev.input(c)
	g, err := rev.Grants(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	for range perRound {
		r := w.request(rng, g, a)
		q := in
		q.Request = &r.req
		allow, err := rev.Allow(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		reply := r.probe.ask(t, r.line)
		got, known := verdict(reply)
		if !known {
			t.Fatalf("round %d: %q gave %q, which says neither allowed nor denied", rounds, r.line, reply)
		}
		st.count(r.req.Kind, allow)
		if got != allow {
			b, _ := json.Marshal(q)
			gb, _ := json.Marshal(g)
			*disagreements = append(*disagreements, fmt.Sprintf("round %d: policy allow=%v, kernel %q for %q\n  input: %s\n  grants: %s",
				rounds, allow, reply, r.line, b, gb))
		}
	}
}

// verdict reads a probe's answer: denied (EPERM, or the exec killed), allowed (it worked, or it
// failed for a reason only an allowed request meets: nothing listens, no route, no such
// socket), or neither.
func verdict(reply string) (allowed, known bool) {
	switch reply {
	case "ok":
		return true, true
	case "eperm", "killed":
		return false, true
	}
	for _, after := range []string{"connection_refused", "network_is_unreachable", "no_route_to_host",
		"no_such_file_or_directory", "cannot_assign_requested_address", "address_already_in_use"} {
		if strings.HasPrefix(reply, "error:") && strings.Contains(reply, after) {
			return true, true
		}
	}
	return false, false
}

// perRound is how many requests each agent answers per context.
const perRound = 40

type identity struct {
	spiffe string
	labels map[string]string
}

// agentIDs are the agents: one without settings, three whose identity names a task type (used
// when they have no task), one in audit mode by identity and one by label.
var agentIDs = []identity{
	{spiffe: "spiffe://diff.test/agent/coder"},
	{spiffe: "spiffe://diff.test/agent/responder", labels: map[string]string{"team": "sre"}},
	{spiffe: "spiffe://diff.test/agent/ops"},
	{spiffe: "spiffe://diff.test/agent/tester"},
	{spiffe: "spiffe://diff.test/agent/auditor"},
	{spiffe: "spiffe://diff.test/agent/labelled", labels: map[string]string{"tether.dev/mode": "audit"}},
}

var identitySettings = map[string]any{
	"spiffe://diff.test/agent/responder": map[string]any{"task_type": "incident-response"},
	"spiffe://diff.test/agent/ops":       map[string]any{"task_type": "customer-operations"},
	"spiffe://diff.test/agent/tester":    map[string]any{"task_type": "difftest"},
	"spiffe://diff.test/agent/auditor":   map[string]any{"task_type": "coding", "mode": "audit"},
}

type agent struct {
	slot       dataplane.Slot
	id         string
	plain, git *probe
}

type stats struct {
	total int
	by    map[string][2]int // kind -> [denied, allowed]
}

func (s *stats) count(kind string, allow bool) {
	if s.by == nil {
		s.by = map[string][2]int{}
	}
	v := s.by[kind]
	if allow {
		v[1]++
	} else {
		v[0]++
	}
	s.by[kind] = v
	s.total++
}

func (s stats) String() string {
	var parts []string
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range s.by {
			if !yield(k) {
				return
			}
		}
	}) {
		parts = append(parts, fmt.Sprintf("%s %d denied/%d allowed", k, s.by[k][0], s.by[k][1]))
	}
	return strings.Join(parts, ", ")
}

// testClockGrants hands the kernel an approval's and a rule set's expiry in real time: the
// registry and the policy run on the test's clock (days away from now, and moved on by hours a
// round), the kernel on the machine's, which would find an approval or a task the test's clock
// has live long expired, or the reverse.
type testClockGrants struct {
	*kernel.Kernel
	clock *clock
}

// real is t, a time of the test's clock, as the same distance from now on the kernel's clock.
func (g testClockGrants) real(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return bootclock.Now().Add(t.Sub(g.clock.Now()))
}

func (g testClockGrants) SetGrant(i uint32, uses int64, expires time.Time) error {
	return g.Kernel.SetGrant(i, uses, g.real(expires))
}

func (g testClockGrants) Install(slot dataplane.Slot, rs *dataplane.RuleSet) error {
	real := *rs
	real.Expires = g.real(rs.Expires)
	return g.Kernel.Install(slot, &real)
}

func (g testClockGrants) SetExpiry(slot dataplane.Slot, expires time.Time) error {
	return g.Kernel.SetExpiry(slot, g.real(expires))
}

// clock is the registry's and the policy's time.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }

func (c *clock) advance(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// evaluator is the daemon's evaluator with the test's clock and environment.
type evaluator struct {
	rev   *policy.Revision
	clock *clock

	mu        sync.Mutex
	env       policy.Env
	bootstrap bool
	bootExec  []string
}

func (e *evaluator) setBootstrap(b bool) { e.mu.Lock(); e.bootstrap = b; e.mu.Unlock() }

func (e *evaluator) setEnv(env policy.Env) { e.mu.Lock(); e.env = env; e.mu.Unlock() }

func (e *evaluator) input(c agents.Context) policy.Input {
	e.mu.Lock()
	defer e.mu.Unlock()
	return policy.ContextInput(c, e.env, policy.TimeAt(e.clock.Now(), time.UTC))
}

func (e *evaluator) Grants(ctx context.Context, c agents.Context) (grants.Grants, error) {
	e.mu.Lock()
	boot := e.bootstrap
	e.mu.Unlock()
	if boot {
		var g grants.Grants
		for _, p := range e.bootExec {
			g.Exec = append(g.Exec, grants.Exec{Path: p})
		}
		return g, nil
	}
	return e.rev.Grants(ctx, e.input(c))
}

func quiet() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
}

// world is the test's files and the policy data that names them.
type world struct {
	dir   string
	self  string            // the test binary: the plain probes run it
	git   string            // a copy of the test binary: the policy's git
	tools map[string]string // shipped path -> the test's copy
	execs []string          // every executable a request may name
	// wrongDigest is a file whose rule names another content: refused by the compiler.
	wrongDigest string
	networks    []netip.Prefix // every prefix the data names
	unix        []string       // every unix grant the data names
	data        map[string]any
}

func newWorld(t *testing.T) *world {
	t.Helper()
	dir, err := os.MkdirTemp("", "tether-test-diff")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.MkdirAll(filepath.Join(dir, "bin"), 0o755)
	os.MkdirAll(filepath.Join(dir, "run", "tools"), 0o755)
	self := privtest.AgentBinary(t)
	w := &world{dir: dir, self: self, tools: map[string]string{}}
	tool := "/usr/bin/true"
	if _, err := os.Stat(tool); err != nil {
		tool = "/bin/true" // the test guest of make test-vm
	}

	raw, err := policies.FS.ReadFile("data.json")
	if err != nil {
		t.Fatal(err)
	}
	var shipped struct {
		Settings struct {
			GitBinary string              `json:"git_binary"`
			Tools     map[string][]string `json:"tools"`
			Profiles  map[string]struct {
				Exec []string `json:"exec"`
			} `json:"profiles"`
		} `json:"tether_settings"`
	}
	if err := json.Unmarshal(raw, &shipped); err != nil {
		t.Fatal(err)
	}
	w.copyTools(t, shipped.Settings.GitBinary, shipped.Settings.Tools, shipped.Settings.Profiles, self, tool)

	// Rename the paths in the data (as JSON strings, so /usr/bin/pip stays apart from pip3).
	s := string(raw)
	for orig, dst := range w.tools {
		s = strings.ReplaceAll(s, strconv.Quote(orig), strconv.Quote(dst))
	}
	if err := json.Unmarshal([]byte(s), &w.data); err != nil {
		t.Fatal(err)
	}
	settings := w.data["tether_settings"].(map[string]any)

	// Networks: each gets a loopback twin; monitoring also reaches ::1.
	networks := settings["networks"].(map[string]any)
	names := loopbackTwins(networks)

	// Unix sockets for the shipped profiles, and a profile of the test's own.
	sock := filepath.Join(dir, "run", "docker.sock")
	tools := filepath.Join(dir, "run", "tools") + "/*"
	abstract := "@" + privtest.Name()
	profiles := settings["profiles"].(map[string]any)
	profiles["coding"].(map[string]any)["unix"] = []any{sock}
	profiles["incident-response"].(map[string]any)["unix"] = []any{tools, sock}
	profiles["customer-operations"].(map[string]any)["unix"] = []any{abstract}
	profiles["difftest"] = w.testProfile(t, tools, abstract)
	settings["identities"] = identitySettings

	for _, name := range names {
		for _, c := range networks[name].([]any) {
			w.networks = append(w.networks, mustPrefix(c.(string)))
		}
	}
	w.networks = append(w.networks, mustPrefix("127.1.0.0/16"), mustPrefix("127.1.2.0/24"), mustPrefix("127.1.2.128/25"),
		mustPrefix("2001:db8::/32"), mustPrefix("127.1.3.0/24"), mustPrefix("127.9.9.9/32"), mustPrefix("127.1.4.0/24"))
	w.unix = []string{sock, tools, abstract, abstract + "-test"}
	return w
}

// copyTools makes every executable the data names (git, the tools, the profiles' execs, and an
// unnamed tool) a file of the test's own: a copy of self for git, of tool for the others.
func (w *world) copyTools(t *testing.T, git string, tools map[string][]string, profiles map[string]struct {
	Exec []string `json:"exec"`
}, self, tool string) {
	t.Helper()
	copyTo := func(orig, from string) {
		if _, ok := w.tools[orig]; ok {
			return
		}
		dst := filepath.Join(w.dir, "bin", strings.ReplaceAll(strings.TrimPrefix(orig, "/"), "/", "_"))
		copyFile(t, from, dst)
		w.tools[orig] = dst
		w.execs = append(w.execs, dst)
	}
	copyTo(git, self)
	w.git = w.tools[git]
	for _, paths := range tools {
		for _, p := range paths {
			copyTo(p, tool)
		}
	}
	for _, p := range profiles {
		for _, e := range p.Exec {
			copyTo(e, tool)
		}
	}
	copyTo("/usr/local/bin/unnamed-tool", tool)
	w.execs = append(w.execs, self)
	slices.Sort(w.execs)

}

// loopbackTwins gives each network a loopback twin (127.30+i.0.0/16; monitoring also ::1) and
// returns the networks' names, sorted.
func loopbackTwins(networks map[string]any) []string {
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range networks {
			if !yield(n) {
				return
			}
		}
	})
	for i, name := range names {
		list := networks[name].([]any)
		list = append(list, fmt.Sprintf("127.%d.0.0/16", 30+i))
		if name == "monitoring" {
			list = append(list, "::1/128")
		}
		networks[name] = list
	}

	return names
}

// testProfile is the test's own profile: exec by path, by pattern and by content (one file
// pinned to its own digest, granted; one to another, refused), egress of every kind, unix
// sockets, listen rules.
func (w *world) testProfile(t *testing.T, tools, abstract string) map[string]any {
	t.Helper()
	dir := w.dir
	profile := map[string]any{
		"exec":      []any{w.tools["/usr/bin/git"], filepath.Join(dir, "bin", "usr_bin_a*"), filepath.Join(dir, "bin", "usr_bin_c*")},
		"high_risk": []any{"cloud_clis", "package_managers"},
		"egress": []any{
			map[string]any{"cidr": "127.1.0.0/16", "ports": []any{"8000-8100", 22}, "protocol": "any"},
			map[string]any{"cidr": "127.1.2.0/24", "ports": []any{443}, "protocol": "tcp", "binary": w.git},
			map[string]any{"cidr": "127.1.2.128/25", "ports": []any{"1-1023"}, "protocol": "udp"},
			map[string]any{"cidr": "::1/128", "protocol": "udp"},
			map[string]any{"cidrs": []any{"2001:db8::/32", "127.1.3.0/24"}, "ports": []any{"1-1024"}, "protocol": "udp"},
			map[string]any{"cidr": "127.9.9.9", "ports": []any{9999}},
			map[string]any{"cidr": "127.1.4.0/24", "ports": []any{"5000-5010"}, "protocol": "tcp", "audit": true},
			map[string]any{"fqdn": "api.diff.test", "ports": []any{443}, "protocol": "tcp"},
			map[string]any{"fqdn": "*.cdn.diff.test"},
		},
		"network_egress": []any{
			map[string]any{"network": "git_hosting", "ports": []any{443}, "protocol": "tcp"},
			map[string]any{"network": "production", "ports": []any{5432}, "protocol": "tcp", "production": true},
			map[string]any{"network": "internal", "ports": []any{"3000-3999"}, "protocol": "tcp",
				"window": map[string]any{"days": []any{"Saturday", "Sunday"}, "start_hour": 10, "end_hour": 16}},
		},
		"unix": []any{tools, abstract + "-test"},
		// Inbound on two ports and a range, TCP only.
		"listen": []any{map[string]any{"ports": []any{8080, "9000-9100"}, "protocol": "tcp"}},
	}
	// Exec by content: one file pinned to its own digest (granted), one to another (refused).
	pinned, wrong := filepath.Join(dir, "bin", "pinned"), filepath.Join(dir, "bin", "wrong-digest")
	w.wrongDigest = wrong
	copyFile(t, w.tools["/usr/bin/git"], pinned)
	copyFile(t, w.tools["/usr/bin/git"], wrong)
	other := sha256.Sum256([]byte("other content"))
	profile["exec"] = append(profile["exec"].([]any),
		map[string]any{"path": pinned, "sha256": w.digest(pinned)}, map[string]any{"path": wrong, "sha256": hex.EncodeToString(other[:])})
	w.execs = append(w.execs, pinned, wrong)
	return profile
}

// digest is the SHA-256 of the file at path, hex (empty when it cannot be read).
func (w *world) digest(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func mustPrefix(s string) netip.Prefix {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked()
	}
	a := netip.MustParseAddr(s)
	return netip.PrefixFrom(a, a.BitLen())
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// revision compiles the shipped Rego with the world's data.
func (w *world) revision(t *testing.T) *policy.Revision {
	t.Helper()
	f, err := policy.FromFS(policies.FS, "shipped policies")
	if err != nil {
		t.Fatal(err)
	}
	f.Data = w.data
	schema, _ := policies.FS.ReadFile("input.schema.json")
	rev, err := policy.Compile(context.Background(), f, schema)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

var (
	taskTypes     = []string{"coding", "incident-response", "customer-operations", "difftest", "demo", "unheard-of"}
	sensitivities = []string{"public", "internal", "confidential", "restricted", "", "Restricted"}
	environments  = []string{"development", "staging", "production", "production", ""}
	resources     = []string{"production", "production", "internal", "git_hosting"}
)

// nextContext moves the clock on (by a minute to a day and a half: every hour and weekday comes
// up, tasks and approvals expire) and changes the environment and each agent's task.
func (w *world) nextContext(t *testing.T, rng *rand.Rand, reg *agents.Registry, clk *clock, ev *evaluator, as []*agent) {
	t.Helper()
	clk.advance(time.Minute * time.Duration(1+rng.IntN(36*60)))
	ev.setEnv(policy.Env{Node: "diff", Environment: pick(rng, environments)})
	for _, a := range as {
		view, _ := reg.Get(a.slot)
		if view.Task != nil && rng.IntN(2) == 0 {
			if _, err := reg.EndTask(a.slot); err != nil {
				t.Fatal(err)
			}
			view.Task = nil
		}
		if view.Task == nil && rng.IntN(4) != 0 {
			spec := agents.TaskSpec{Type: pick(rng, taskTypes), Sensitivity: pick(rng, sensitivities),
				TTL: time.Minute * time.Duration(1+rng.IntN(12*60))}
			if _, err := reg.StartTask(a.slot, spec); err != nil {
				t.Fatal(err)
			}
		}
		if view, _ = reg.Get(a.slot); view.Task != nil && rng.IntN(3) == 0 {
			ttl := time.Minute * time.Duration(1+rng.IntN(120))
			if _, err := reg.AddApproval(a.slot, "connect", pick(rng, resources), "tester", ttl, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func pick[T any](rng *rand.Rand, list []T) T { return list[rng.IntN(len(list))] }

// sample is one request: what the policy is asked and what the probe is told.
type sample struct {
	req   policy.Request
	probe *probe
	line  string
}

// request makes a request for agent a whose grants are g: about half aimed at what g grants
// (inside a granted prefix, at a granted port or just beside it), the rest anywhere.
func (w *world) request(rng *rand.Rand, g grants.Grants, a *agent) sample {
	p, bin := a.plain, w.self
	if rng.IntN(2) == 0 {
		p, bin = a.git, w.git
	}
	switch n := rng.IntN(100); {
	case n < 8:
		name := pick(rng, dnsNames)
		return sample{req: policy.Request{Kind: "dns", Name: name}, probe: p, line: "dns " + name}
	case n < 25:
		path := w.unixPath(rng, g)
		return sample{req: policy.Request{Kind: "unix", Path: path}, probe: p, line: "unix " + path}
	case n < 50:
		path := pick(rng, w.execs)
		if rng.IntN(2) == 0 && len(g.Exec) > 0 {
			if m, _ := filepath.Glob(pick(rng, g.Exec).Path); len(m) > 0 {
				path = pick(rng, m)
			}
		}
		return sample{req: policy.Request{Kind: "exec", Path: path, SHA256: w.digest(path)}, probe: p, line: "exec " + path}
	case n < 62:
		addr := pick(rng, []string{"127.0.0.1", "127.1.2.3", "0.0.0.0", "::1", "::"})
		port := pick(rng, []uint16{0, 8080, 8081, 9000, 9050, 9100, 9101, 7999, uint16(20000 + rng.IntN(20000))})
		proto := pick(rng, []string{"tcp", "udp"})
		req := policy.Request{Kind: "bind", IP: addr, Port: int(port), Protocol: proto}
		return sample{req: req, probe: p, line: "bind" + proto + " " + netip.AddrPortFrom(netip.MustParseAddr(addr), port).String()}
	}
	addr, port := w.destination(rng, g)
	proto := "udp"
	if addr.IsLoopback() && rng.IntN(2) == 0 {
		proto = "tcp" // TCP goes to loopback only
	}
	kind := proto
	switch n := rng.IntN(6); {
	case n == 0 && addr.Is4():
		kind = proto + "4mapped" // the v4-mapped form through an IPv6 socket is matched as IPv4
	case n == 1 && proto == "udp" && addr.IsLoopback():
		kind = "udpsend" // sendmsg on an unconnected socket
	}
	req := policy.Request{Kind: "connect", IP: addr.String(), Port: int(port), Protocol: proto, Binary: bin}
	return sample{req: req, probe: p, line: kind + " " + netip.AddrPortFrom(addr, port).String()}
}

func (w *world) destination(rng *rand.Rand, g grants.Grants) (netip.Addr, uint16) {
	var prefixes []netip.Prefix
	var ports []uint16
	for _, e := range g.Egress {
		if e.CIDR != "" {
			prefixes = append(prefixes, mustPrefix(e.CIDR))
		}
		for _, c := range e.CIDRs {
			prefixes = append(prefixes, mustPrefix(c))
		}
		for _, r := range e.Ports {
			ports = append(ports, r.Lo, r.Hi, r.Lo-1, r.Hi+1)
		}
	}
	var addr netip.Addr
	switch n := rng.IntN(10); {
	case n < 5 && len(prefixes) > 0:
		addr = near(rng, pick(rng, prefixes))
	case n < 8:
		addr = near(rng, pick(rng, w.networks))
	case n < 9:
		var b [4]byte
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		addr = netip.AddrFrom4(b)
	default:
		var b [16]byte
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		addr = netip.AddrFrom16(b)
	}
	var port uint16
	if rng.IntN(3) != 0 && len(ports) > 0 {
		port = pick(rng, ports)
	} else {
		port = pick(rng, []uint16{22, 5353, 80, 443, 3000, 5432, 6443, 8080, 9090, uint16(1 + rng.IntN(65535))})
	}
	if port == 0 || port == 53 {
		port++ // port 0 is not a destination; port 53 goes to the DNS proxy (the dns requests)
	}
	// Addresses a connect refuses on its own (no destination, or an IPv6 link-local one, which
	// needs a scope id: EINVAL) say nothing about tether; aim those at a documentation address.
	if addr.Is4() && addr.As4()[0] == 0 || addr.IsMulticast() || addr.IsUnspecified() || addr.Is6() && addr.IsLinkLocalUnicast() {
		addr = netip.MustParseAddr("192.0.2.1")
	}
	return addr, port
}

// near is an address inside p, at its edges, or just outside.
func near(rng *rand.Rand, p netip.Prefix) netip.Addr {
	first := p.Masked().Addr()
	last := lastOf(p)
	switch rng.IntN(6) {
	case 0:
		return first
	case 1:
		return last
	case 2:
		if prev := first.Prev(); prev.IsValid() {
			return prev
		}
	case 3:
		if next := last.Next(); next.IsValid() {
			return next
		}
	}
	b := first.AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		if rng.IntN(2) == 1 {
			b[i/8] |= 0x80 >> (i % 8)
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func lastOf(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// unixPath is a socket path: a granted one, one inside or beside a granted directory, or another.
func (w *world) unixPath(rng *rand.Rand, g grants.Grants) string {
	base := pick(rng, w.unix)
	if rng.IntN(2) == 0 && len(g.Unix) > 0 {
		base = pick(rng, g.Unix).Path
	}
	if dir, ok := strings.CutSuffix(base, "/*"); ok {
		return pick(rng, []string{dir + "/agent.sock", dir + "/nested/deeper.sock", dir, dir + "x/other.sock", filepath.Dir(dir) + "/else.sock",
			dir + "/../docker.sock", dir + "/a/../b.sock", dir + "/..", dir + "/./c.sock"})
	}
	return pick(rng, []string{base, base, base + "2", filepath.Join(w.dir, "run", "missing.sock"), base + "/.."})
}

// probe is a helper process inside an agent's cgroup that makes the requests.
type probe struct {
	in  io.WriteCloser
	out chan string
}

func startProbe(t *testing.T, cgroup, binary string) *probe {
	t.Helper()
	cmd := privtest.Command(t, cgroup, "probe")
	cmd.Path, cmd.Args[0] = binary, binary
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Wait() })
	p := &probe{in: stdin, out: make(chan string)}
	go func() {
		defer close(p.out)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.out <- sc.Text()
		}
	}()
	// The probe runs (its exec was allowed) once it answers.
	if got := p.ask(t, "exec "+binary); got != "ok" {
		t.Fatalf("probe %s did not start: %q", binary, got)
	}
	return p
}

func (p *probe) ask(t *testing.T, line string) string {
	t.Helper()
	if _, err := fmt.Fprintln(p.in, line); err != nil {
		t.Fatalf("probe: %v", err)
	}
	select {
	case reply, ok := <-p.out:
		if !ok {
			t.Fatalf("probe, asked %q: it ended", line)
		}
		return reply
	case <-time.After(10 * time.Second):
		t.Fatalf("probe, asked %q: no answer in 10s", line)
	}
	return ""
}
