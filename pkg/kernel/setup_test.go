package kernel

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/dataplane"
)

func TestMain(m *testing.M) { privtest.Main(m) }

type fixture struct {
	k      *Kernel
	pin    string
	parent string
	self   dataplane.FileID // the test binary, which helpers run as
}

// openKernel opens the programs with pins in pin; the caller closes the handle.
func openKernel(t *testing.T, pin string, opts Options) *Kernel {
	t.Helper()
	opts.PinDir = pin
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	k, err := Open(opts)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	// Retired host rules go as soon as they can, so that tests meet that switch too.
	k.cleanupDelay = 0
	return k
}

// newFixture loads the programs with test pins and attaches them at a fresh test cgroup.
func newFixture(t *testing.T, opts Options) *fixture {
	t.Helper()
	privtest.Gate(t)
	f := &fixture{pin: privtest.PinDir(t), parent: privtest.Cgroup(t), self: selfID(t)}
	if opts.AllowSample == 0 {
		opts.AllowSample = 1
	}
	f.k = openKernel(t, f.pin, opts)
	// Registered before any agent: runs after their cleanups, which use f.k (which a test may
	// replace with a reopened handle).
	t.Cleanup(func() { f.k.Close() })
	if err := f.k.AttachParent(f.parent); err != nil {
		t.Fatal(err)
	}
	return f
}

func selfID(t *testing.T) dataplane.FileID {
	t.Helper()
	return fileID(t, privtest.AgentBinary(t))
}

// fileID identifies the file at path and remembers its change time, which execs grants it at.
func fileID(t *testing.T, path string) dataplane.FileID {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	id := dataplane.FileID{Dev: st.Dev, Ino: st.Ino}
	changeTimes.Store(id, st.Ctim.Nano())
	return id
}

// unixDirs is where the unix rules' paths lead, as compile.unixDirs finds it: the directory (by
// identity) and name of an exact path, the directory of a prefix; paths whose directory does not
// exist lead nowhere.
func unixDirs(rules []dataplane.Unix) []dataplane.UnixDir {
	var out []dataplane.UnixDir
	for _, u := range rules {
		if strings.HasPrefix(u.Path, "@") {
			continue
		}
		dir, name := filepath.Split(u.Path)
		if u.Prefix {
			dir, name = u.Path, ""
		}
		var st syscall.Stat_t
		if syscall.Stat(dir, &st) == nil {
			out = append(out, dataplane.UnixDir{Dir: dataplane.FileID{Dev: st.Dev, Ino: st.Ino}, Name: name, Audit: u.Audit})
		}
	}
	return out
}

// changeTimes are the change times fileID saw, by file.
var changeTimes sync.Map

// agent creates a cgroup under the fixture's parent bound to slot with rule set rs (which
// always allows exec of the test binary, so helpers can run). It returns the cgroup path.
func (f *fixture) agent(t *testing.T, name string, slot dataplane.Slot, rs dataplane.RuleSet) string {
	t.Helper()
	path, id := privtest.SubCgroup(t, f.parent, name)
	rs.Exec = append(rs.Exec, execs(f.self)...)
	if rs.UnixDirs == nil {
		rs.UnixDirs = unixDirs(rs.Unix) // as the compiler does
	}
	if err := f.k.Install(slot, &rs); err != nil {
		t.Fatal(err)
	}
	if err := f.k.SetFlags(slot, dataplane.AgentActive); err != nil {
		t.Fatal(err)
	}
	if err := f.k.Bind(id, slot); err != nil {
		t.Fatal(err)
	}
	// The sweep finds the agent's sockets in the network namespaces of its processes, by the
	// cgroup its info records.
	if err := f.k.PutInfo(slot, dataplane.Info{SpiffeID: "spiffe://test.local/" + name, CgroupPath: path, CgroupID: id}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.k.Clear(slot); err != nil {
			t.Errorf("clearing slot %d: %v", slot, err)
		}
	})
	return path
}

func prefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func allowAll(p string, proto dataplane.Proto) dataplane.Egress {
	return dataplane.Egress{Prefix: prefix(p), Ports: []dataplane.PortRule{{Proto: proto, Lo: 0, Hi: 65535}}}
}

// eventLog collects the kernel's events for the length of a test.
type eventLog struct {
	mu     sync.Mutex
	events []dataplane.Event
}

func (f *fixture) events(t *testing.T) *eventLog {
	t.Helper()
	rd, err := f.k.NewEventReader()
	if err != nil {
		t.Fatal(err)
	}
	l := &eventLog{}
	done := make(chan error, 1)
	go func() {
		for {
			e, err := rd.Read()
			if err != nil {
				done <- err
				return
			}
			l.mu.Lock()
			l.events = append(l.events, e)
			l.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		rd.Close()
		select {
		case err := <-done:
			if !errors.Is(err, ErrClosed) {
				t.Errorf("Read after Close: %v, want ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Close did not end a waiting Read")
		}
	})
	return l
}

// wait returns the first event matching match, failing the test after a few seconds.
func (l *eventLog) wait(t *testing.T, what string, match func(dataplane.Event) bool) dataplane.Event {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		for _, e := range l.events {
			if match(e) {
				l.mu.Unlock()
				return e
			}
		}
		l.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	l.mu.Lock()
	for _, e := range l.events {
		t.Logf("event: %s %s %s slot %d generation %d %s:%d", e.Kind, e.Verdict, e.Reason, e.Slot, e.Generation, e.Addr, e.Port)
	}
	l.mu.Unlock()
	t.Fatalf("no event: %s", what)
	return dataplane.Event{}
}

func expect(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %v\n want %v", what, got, want)
	}
}

func execs(ids ...dataplane.FileID) []dataplane.ExecRule {
	var out []dataplane.ExecRule
	for _, id := range ids {
		changed, _ := changeTimes.Load(id)
		ns, _ := changed.(int64)
		out = append(out, dataplane.ExecRule{File: id, Changed: ns})
	}
	return out
}
