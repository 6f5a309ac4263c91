package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/api"
	"github.com/tether-sh/tether/pkg/cgroups"
)

// startSleeper starts the sleep helper born in cgroup cg; closing the returned writer ends it.
func startSleeper(t *testing.T, cg string) (io.WriteCloser, int) {
	t.Helper()
	cmd := privtest.Command(t, cg, "sleep")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
	return stdin, cmd.Process.Pid
}

// agentAt waits until an agent is registered for cgroup cg and returns it.
func (d *tetherd) agentAt(cg string) agents.Agent {
	d.t.Helper()
	var found agents.Agent
	waitFor(d.t, "an agent for "+cg, func() bool {
		i := slices.IndexFunc(d.agents(), func(a agents.Agent) bool { return a.Cgroup == cg })
		if i < 0 {
			return false
		}
		found = d.agents()[i]
		return true
	})
	return found
}

func (d *tetherd) status() api.Status {
	d.t.Helper()
	var st api.Status
	if err := json.Unmarshal([]byte(d.ctl("status", "-o", "json")), &st); err != nil {
		d.t.Fatal(err)
	}
	return st
}

// relCgroup is cg below the cgroup2 mount, as identity rules name it.
func relCgroup(t *testing.T, cg string) string {
	return strings.TrimPrefix(cg, privtest.Cgroup2(t))
}

// TestPrivilegedStaticIdentity: a cgroup below the agent parent that matches a static rule
// becomes an agent of the rule's ID when a process enters it (nobody launched it), and gets
// exactly that ID's grants; one that two rules give different IDs is a conflict and stays no
// agent (denied); a removed cgroup's agent is unregistered.
func TestPrivilegedStaticIdentity(t *testing.T) {
	h := privtest.NewHost(t)
	okPort, okCount := tcpPort(t, h)
	noPort, noCount := tcpPort(t, h)
	self := privtest.AgentBinary(t)
	d := newTetherd(t, grantsFor(self, h, okPort))
	rel := relCgroup(t, d.parent)
	d.extra = fmt.Sprintf(`identity:
  trust_domains: [test.local]
  static:
    - id: %s
      cgroup: %s/static-*
    - id: spiffe://test.local/other
      cgroup: %s/both-*
    - id: spiffe://test.local/third
      cgroup: %s/both-*
`, agentID, rel, rel, rel)
	d.writeConfig()
	d.start()
	ok := fmt.Sprintf("%s:%d", h.V4, okPort)
	no := fmt.Sprintf("%s:%d", h.V4, noPort)

	cg, _ := privtest.SubCgroup(t, d.parent, "static-1")
	stop, _ := startSleeper(t, cg)
	a := d.agentAt(cg)
	if a.SpiffeID != agentID || a.Launched || !slices.Contains(a.Selectors, "static:cgroup:"+rel+"/static-*") || !a.Synced {
		t.Fatalf("discovered agent %+v", a)
	}
	if got := privtest.Dial(t, cg, "tcp", ok, "tcp", no); !slices.Equal(got, []string{"ok", "eperm"}) {
		t.Errorf("static agent verdicts %v, want ok (granted), eperm", got)
	}
	if okCount.await(1) != 1 || noCount.get() != 0 {
		t.Errorf("listeners accepted %d (granted) and %d (not granted)", okCount.get(), noCount.get())
	}

	// Two rules, two IDs: no agent, and the status counts the conflict.
	both, _ := privtest.SubCgroup(t, d.parent, "both-1")
	startSleeper(t, both)
	waitFor(t, "the conflict counted", func() bool { return d.status().Identity.Conflicts == 1 })
	if slices.ContainsFunc(d.agents(), func(a agents.Agent) bool { return a.Cgroup == both }) {
		t.Error("a cgroup two rules name differently became an agent")
	}
	if got := privtest.Dial(t, both, "tcp", ok); !slices.Equal(got, []string{"eperm"}) {
		t.Errorf("conflicting cgroup (no agent, unknown_cgroup deny): %v", got)
	}
	if !strings.Contains(d.stderr.String(), "static rules give two identities") {
		t.Errorf("the log does not say why:\n%s", d.stderr.String())
	}

	// A cgroup no rule names is left alone (no agent).
	plain, _ := privtest.SubCgroup(t, d.parent, "plain")
	startSleeper(t, plain)
	time.Sleep(300 * time.Millisecond)
	if slices.ContainsFunc(d.agents(), func(a agents.Agent) bool { return a.Cgroup == plain }) {
		t.Error("a cgroup no rule names became an agent")
	}

	// The cgroup goes away: so does the agent.
	stop.Close()
	if err := cgroups.Remove(cg, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the agent of a removed cgroup unregistered", func() bool {
		return !slices.ContainsFunc(d.agents(), func(a agents.Agent) bool { return a.Cgroup == cg })
	})

	// A SPIFFE ID that is not one is refused with why (by tetherctl, before tetherd is asked).
	if _, stderr, code := d.ctlRaw("run", "--id", "agent-7", "--", self); code == 0 || !strings.Contains(stderr, `--id "agent-7" is not a SPIFFE ID`) {
		t.Errorf("launch with a malformed SPIFFE ID: exit %d, %q", code, stderr)
	}
	// A launch in a trust domain that is not configured is refused with why.
	_, stderr, code := d.ctlRaw("run", "--id", "spiffe://elsewhere.org/agent", "--", self)
	if code == 0 || !strings.Contains(stderr, `trust domain "elsewhere.org" is not configured`) {
		t.Errorf("launch outside the trust domains: exit %d, %q", code, stderr)
	}
}
