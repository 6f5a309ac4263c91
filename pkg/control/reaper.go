package control

import (
	"errors"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
)

// reaper removes launched agents that ended without their launcher removing them: the launcher
// (tetherctl run) was killed, or tetherd was down when the agent ended. A launched agent is over
// when its cgroup is empty and its launcher is gone; the launcher is watched through a pidfd, so
// a reused pid cannot fool it.
type reaper struct {
	mu        sync.Mutex
	launchers map[dataplane.Slot]int // pidfd of the launcher
	empty     map[dataplane.Slot]time.Time
}

// adoptedGrace is how long an adopted launched agent (its launcher unknown) may stay empty: its
// launcher may be between registering and starting the command.
const adoptedGrace = 10 * time.Second

func newReaper() *reaper {
	return &reaper{launchers: map[dataplane.Slot]int{}, empty: map[dataplane.Slot]time.Time{}}
}

func (r *reaper) watch(slot dataplane.Slot, pid int32) {
	fd, err := unix.PidfdOpen(int(pid), 0)
	if err != nil {
		return // the launcher is already gone: the emptiness of the cgroup decides alone
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.launchers[slot]; ok {
		unix.Close(old)
	}
	r.launchers[slot] = fd
}

func (r *reaper) forget(slot dataplane.Slot) {
	if fd, ok := r.launchers[slot]; ok {
		unix.Close(fd)
		delete(r.launchers, slot)
	}
	delete(r.empty, slot)
}

func (r *reaper) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for slot := range r.launchers {
		r.forget(slot)
	}
}

// exited reports whether the process behind a pidfd has ended (its pidfd is readable).
func exited(pidfd int) bool {
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && n > 0
}

func (r *reaper) sweep(reg *agents.Registry, log *slog.Logger) {
	r.mu.Lock()
	defer r.mu.Unlock()
	launched := reg.Launched()
	for slot := range r.launchers {
		if _, ok := launched[slot]; !ok {
			r.forget(slot)
		}
	}
	for slot, path := range launched {
		populated, err := cgroups.Populated(path)
		if err == nil && populated {
			delete(r.empty, slot)
			continue
		}
		if fd, ok := r.launchers[slot]; ok {
			if !exited(fd) {
				continue // the launcher is alive: it starts the command, or removes the agent itself
			}
		} else if err == nil {
			since, seen := r.empty[slot]
			if !seen {
				r.empty[slot] = time.Now()
				continue
			}
			if time.Since(since) < adoptedGrace {
				continue
			}
		}
		if err := reg.Unregister(slot); err != nil && !errors.Is(err, agents.ErrNotFound) {
			log.Warn("removing ended agent", "slot", slot, "error", err)
			continue
		}
		log.Info("launched agent ended; removed", "slot", slot, "cgroup", path)
		r.forget(slot)
	}
}
