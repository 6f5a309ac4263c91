package cgroups_test

import (
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/cgroups"
)

func next(t *testing.T, w *cgroups.Watcher) cgroups.Change {
	t.Helper()
	select {
	case c := <-w.Changes():
		return c
	case <-time.After(5 * time.Second):
		t.Fatal("no cgroup change reported within 5 s")
		return cgroups.Change{}
	}
}

// TestPrivilegedWatch: a populated cgroup that exists is reported at start; a new nested cgroup
// is reported when a process enters it (not when it is made, and not its parents, which hold no
// process of their own); removal is reported; an emptied and refilled cgroup is reported again.
func TestPrivilegedWatch(t *testing.T) {
	privtest.Gate(t)
	root := privtest.Cgroup(t)
	old, _ := privtest.SubCgroup(t, root, "old")
	first := privtest.Start(t, old, "sleep", "60")

	w, err := cgroups.Watch(root)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if c := next(t, w); c.Path != old || !slices.Contains(c.Procs, first.Process.Pid) {
		t.Fatalf("at start: %+v, want %s with pid %d", c, old, first.Process.Pid)
	}

	mid, _ := privtest.SubCgroup(t, root, "a")
	leaf, _ := privtest.SubCgroup(t, mid, "b")
	time.Sleep(100 * time.Millisecond) // mkdir alone reports nothing
	select {
	case c := <-w.Changes():
		t.Fatalf("reported an empty cgroup: %+v", c)
	default:
	}
	p := privtest.Start(t, leaf, "sleep", "60")
	if c := next(t, w); c.Path != leaf || !slices.Equal(c.Procs, []int{p.Process.Pid}) {
		t.Fatalf("new nested cgroup: %+v, want %s with pid %d", c, leaf, p.Process.Pid)
	}

	p.Process.Kill()
	p.Wait()
	if err := cgroups.WaitEmpty(leaf, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	again := privtest.Start(t, leaf, "sleep", "60")
	if c := next(t, w); c.Path != leaf || !slices.Equal(c.Procs, []int{again.Process.Pid}) {
		t.Fatalf("refilled cgroup: %+v, want %s with pid %d", c, leaf, again.Process.Pid)
	}
	again.Process.Kill()
	again.Wait()
	if err := cgroups.Remove(leaf, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	for {
		c := next(t, w)
		if c.Removed {
			if c.Path != leaf {
				t.Fatalf("removed: %+v, want %s", c, leaf)
			}
			break
		}
		if c.Path != leaf {
			t.Fatalf("unexpected change %+v", c)
		}
	}
	if filepath.Dir(leaf) != mid {
		t.Fatal("fixture")
	}
}
