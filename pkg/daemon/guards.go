package daemon

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
)

// guardFollowUp counts a guard's denial (tether_guard_denials_total) and finishes in user space
// what a kernel guard began: a granted executable denied
// because it changed is granted again when its content is still the granted one (the agents'
// grants are compiled again, which checks its digest); an agent process moved out of its agent
// that the kernel could not kill (moved by another process, before Linux 6.13) is killed here.
func (d *Daemon) guardFollowUp(rec *events.Decision) {
	d.metrics.ObserveGuard(*rec)
	switch {
	case rec.Kind == dataplane.KindExec.String() && rec.Reason == dataplane.ReasonModifiedFile.String():
		select {
		case d.recompile <- struct{}{}:
		default: // one is pending already
		}
	case rec.Kind == dataplane.KindMigrate.String() && rec.Verdict == dataplane.VerdictDeny.String() && !rec.Killed:
		if err := killMoved(int(rec.PID), rec.Cgroup); err != nil {
			d.log.Error("an agent process left its agent and could not be killed", "pid", rec.PID, "cgroup", rec.Cgroup, "error", err)
			return
		}
		rec.Killed = true
	}
}

// killMoved kills process pid if it is still in the cgroup it was moved to (relative to the
// cgroup2 root, as the kernel recorded it): a pidfd pins the process, so a PID reused since is
// never hit.
func killMoved(pid int, cgroup string) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // gone already
	}
	if err != nil {
		return fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(fd)
	now, err := cgroups.PathOf(pid)
	if err != nil {
		return nil // ended meanwhile
	}
	if now != cgroup {
		return fmt.Errorf("process %d is in %s, not in %s where the kernel saw it go: not the same process, or moved again", pid, now, cgroup)
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("pidfd_send_signal: %w", err)
	}
	return nil
}
