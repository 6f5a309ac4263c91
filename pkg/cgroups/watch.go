package cgroups

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/fsnotify/fsnotify"
)

// Change is one thing that happened to a cgroup below a watched root.
type Change struct {
	Path string
	// Procs are the processes in the cgroup itself (not its children) when it became populated;
	// empty when the cgroup was removed.
	Procs   []int
	Removed bool
}

// Watcher reports cgroups below its roots that get processes and cgroups that are removed,
// from inotify events (the kernel notifies a change of cgroup.events, and mkdir and rmdir), so
// a cgroup that lives for a moment is seen too. It is not a polling loop.
type Watcher struct {
	w       *fsnotify.Watcher
	changes chan Change
	errs    chan error
	done    chan struct{}
	wg      sync.WaitGroup

	mu       sync.Mutex
	watched  map[string]bool
	reported map[string][]int // the processes a populated cgroup was last reported with
}

// Watch starts watching the cgroup trees below roots; existing cgroups that hold processes are
// reported first.
func Watch(roots ...string) (*Watcher, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("watching cgroups: %w", err)
	}
	w := &Watcher{w: fw, changes: make(chan Change, 256), errs: make(chan error, 16), done: make(chan struct{}),
		watched: map[string]bool{}, reported: map[string][]int{}}
	var initial []Change
	for _, r := range roots {
		c, err := w.addTree(r)
		if err != nil {
			fw.Close()
			return nil, err
		}
		initial = append(initial, c...)
	}
	w.wg.Add(1)
	go w.run(initial)
	return w, nil
}

// Changes delivers what happened; it is closed by Close.
func (w *Watcher) Changes() <-chan Change { return w.changes }

// Errors delivers what the watcher could not follow (an overflowed inotify queue: a rescan follows).
func (w *Watcher) Errors() <-chan error { return w.errs }

// Close stops the watcher.
func (w *Watcher) Close() error {
	close(w.done)
	err := w.w.Close()
	w.wg.Wait()
	return err
}

// addTree watches dir and every cgroup below it, and returns those that hold processes and
// were not reported yet. A cgroup made while the tree is walked is seen either by the walk or
// by the watch of its parent, which is added before the parent is read.
func (w *Watcher) addTree(dir string) ([]Change, error) {
	var out []Change
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && p != dir {
				return nil // removed meanwhile
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		w.mu.Lock()
		seen := w.watched[p]
		w.watched[p] = true
		w.mu.Unlock()
		if !seen {
			// The directory for mkdir and rmdir below it; cgroup.events itself, because the
			// kernel notifies its changes only to watchers of a file whose inode is in use.
			for _, f := range []string{p, filepath.Join(p, "cgroup.events")} {
				if err := w.w.Add(f); err != nil {
					if errors.Is(err, fs.ErrNotExist) && p != dir {
						return filepath.SkipDir
					}
					return fmt.Errorf("watching cgroup %s: %w", p, err)
				}
			}
		}
		if c, ok := w.check(p); ok {
			out = append(out, c)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("watching cgroups below %s: %w", dir, err)
	}
	return out, nil
}

// check reports p when it holds processes and none of those it was last reported with (the
// kernel may fold "emptied" and "populated again" into one notification).
func (w *Watcher) check(p string) (Change, bool) {
	procs := Procs(p)
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(procs) == 0 {
		delete(w.reported, p)
		return Change{}, false
	}
	if slices.ContainsFunc(procs, func(pid int) bool { return slices.Contains(w.reported[p], pid) }) {
		return Change{}, false
	}
	w.reported[p] = procs
	return Change{Path: p, Procs: procs}, true
}

func (w *Watcher) run(initial []Change) {
	defer w.wg.Done()
	defer close(w.changes)
	send := func(c Change) bool {
		select {
		case w.changes <- c:
			return true
		case <-w.done:
			return false
		}
	}
	for _, c := range initial {
		if !send(c) {
			return
		}
	}
	for {
		select {
		case <-w.done:
			return
		case err, ok := <-w.w.Errors:
			if !ok {
				return
			}
			select {
			case w.errs <- err:
			default:
			}
			// Events may be lost (queue overflow): look at every watched tree again.
			w.mu.Lock()
			dirs := make([]string, 0, len(w.watched))
			for d := range w.watched {
				dirs = append(dirs, d)
			}
			w.mu.Unlock()
			for _, d := range dirs {
				cs, _ := w.addTree(d)
				for _, c := range cs {
					if !send(c) {
						return
					}
				}
			}
		case ev, ok := <-w.w.Events:
			if !ok {
				return
			}
			var cs []Change
			switch {
			case ev.Has(fsnotify.Create):
				if st, err := os.Stat(ev.Name); err == nil && st.IsDir() {
					cs, _ = w.addTree(ev.Name)
				}
			case ev.Has(fsnotify.Remove) && w.forget(ev.Name):
				cs = []Change{{Path: ev.Name, Removed: true}}
			case ev.Has(fsnotify.Write) && filepath.Base(ev.Name) == "cgroup.events":
				if c, ok := w.check(filepath.Dir(ev.Name)); ok {
					cs = []Change{c}
				}
			}
			for _, c := range cs {
				if !send(c) {
					return
				}
			}
		}
	}
}

// forget drops a removed cgroup; it reports whether p was one.
func (w *Watcher) forget(p string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.watched[p] {
		return false
	}
	delete(w.watched, p)
	delete(w.reported, p)
	return true
}
