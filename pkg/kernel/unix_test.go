package kernel

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func listenUnix(t *testing.T, network, path string) {
	t.Helper()
	var err error
	var c interface{ Close() error }
	if network == "unixgram" {
		c, err = net.ListenUnixgram(network, &net.UnixAddr{Name: path, Net: network})
	} else {
		c, err = net.Listen(network, path)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
}

// TestPrivilegedUnix checks unix socket rules: exact paths, directory prefixes (which ".." cannot
// climb out of), abstract names, and datagram sends.
func TestPrivilegedUnix(t *testing.T) {
	f := newFixture(t, Options{})
	if feat := f.k.Features(); !feat.hook("connect_unix").Active && !feat.hook("connect_unix_lsm").Active {
		// Nothing can enforce unix rules here; the probe must say so.
		if !strings.Contains(feat.hook("connect_unix").Reason, "NOT enforced") {
			t.Errorf("unix sockets unenforceable, but the status does not say so: %+v", feat.hook("connect_unix"))
		}
		t.Skip("this kernel has neither cgroup unix hooks (Linux 6.7) nor usable BPF LSM")
	}
	dir, err := os.MkdirTemp("", "tt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	allowed, denied, inSub := filepath.Join(dir, "allowed.sock"), filepath.Join(dir, "denied.sock"), filepath.Join(dir, "sub", "x.sock")
	gram := filepath.Join(dir, "gram.sock")
	abstractOK, abstractNo := "@"+privtest.Name(), "@"+privtest.Name()
	for _, p := range []string{allowed, denied, inSub, abstractOK, abstractNo} {
		listenUnix(t, "unix", p)
	}
	listenUnix(t, "unixgram", gram)

	agent := f.agent(t, "agent", 13, dataplane.RuleSet{Unix: []dataplane.Unix{
		{Path: allowed}, {Path: filepath.Join(dir, "sub") + "/", Prefix: true}, {Path: abstractOK}, {Path: gram},
	}})
	events := f.events(t)
	got := privtest.Dial(t, agent,
		"unix", allowed, "unix", denied, "unix", inSub,
		"unix", filepath.Join(dir, "sub", "..", "denied.sock"),
		"unix", abstractOK, "unix", abstractNo,
		"unixgramsend", gram, "unixgramsend", denied,
		"unix", allowed+"x", // a longer name is not the exact path
	)
	expect(t, "unix verdicts", got, []string{"ok", "eperm", "ok", "eperm", "ok", "eperm", "ok", "eperm", "eperm"})

	e := events.wait(t, "connect_unix deny", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindConnectUnix && e.Verdict == dataplane.VerdictDeny && e.Target == denied
	})
	if e.Slot != 13 {
		t.Errorf("event %+v", e)
	}
	events.wait(t, "abstract deny", func(e dataplane.Event) bool {
		return e.Kind == dataplane.KindConnectUnix && e.Target == abstractNo
	})
}
