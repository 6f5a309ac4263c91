// Package bootclock is the clock of tether's deadlines: CLOCK_BOOTTIME, the clock the BPF programs
// read (bpf_ktime_get_boot_ns), shown as wall-clock time.
//
// A deadline (a task's expiry, a counted grant's, a rule set's) is kept in this clock from the
// moment it is made, so that the kernel and tetherd agree on it: suspended time counts (as it does
// for CLOCK_BOOTTIME and the wall clock, and not for Go's monotonic clock), and a wall-clock step
// (NTP, an operator's date) does not move it. Its times read as wall-clock times: those of the
// wall clock at the moment this process started, advanced by CLOCK_BOOTTIME since. They differ
// from the wall clock by the steps the wall clock took since then.
package bootclock

import (
	"time"

	"golang.org/x/sys/unix"
)

// epoch is the wall-clock time at which CLOCK_BOOTTIME was zero, taken once, without Go's
// monotonic reading: every time this package gives out is epoch plus a CLOCK_BOOTTIME reading.
var epoch = func() time.Time {
	wall := time.Now()
	return wall.Round(0).Add(-time.Duration(Nanos()))
}()

// Nanos is CLOCK_BOOTTIME now, in nanoseconds.
func Nanos() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		// Linux has had CLOCK_BOOTTIME since 2.6.39; this is not reached.
		panic("bootclock: CLOCK_BOOTTIME: " + err.Error())
	}
	return uint64(ts.Nano())
}

// Now is the time now in this clock.
func Now() time.Time { return epoch.Add(time.Duration(Nanos())) }

// Epoch is when CLOCK_BOOTTIME was zero, in this clock.
func Epoch() time.Time { return epoch }

// At is CLOCK_BOOTTIME nanoseconds ns as a time of this clock (a kernel event's timestamp).
func At(ns uint64) time.Time { return epoch.Add(time.Duration(ns)) }

// Deadline is t as CLOCK_BOOTTIME nanoseconds, for the kernel: at least 1 (0 says "none" to the
// programs), so a time before boot is a deadline already passed. t is a time of this clock (Now
// plus a duration); a time from the wall clock (a policy's valid_until) is off by the wall clock's
// steps since this process started.
func Deadline(t time.Time) uint64 {
	return uint64(max(t.Round(0).Sub(epoch), 1))
}
