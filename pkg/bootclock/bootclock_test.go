package bootclock

import (
	"testing"
	"time"
)

// The clock follows CLOCK_BOOTTIME: a deadline made from Now converts to the boot nanoseconds the
// kernel compares with, whatever the wall clock does meanwhile.
func TestDeadlineIsBootTime(t *testing.T) {
	before := Nanos()
	now := Now()
	after := Nanos()
	if got := Deadline(now); got < before || got > after {
		t.Fatalf("Deadline(Now()) = %d, want between the boot readings %d and %d", got, before, after)
	}
	if got, want := Deadline(now.Add(90*time.Second)), Deadline(now)+uint64(90*time.Second); got != want {
		t.Fatalf("Deadline(now+90s) = %d, want %d", got, want)
	}
	if got := Deadline(Epoch().Add(-time.Hour)); got != 1 {
		t.Fatalf("a deadline before boot = %d, want 1 (passed, and not 0: none)", got)
	}
	if At(Deadline(now)) != now {
		t.Fatalf("At(Deadline(t)) != t")
	}
}

// Its times carry no monotonic reading: comparing and subtracting them uses the boot-time value,
// not Go's monotonic clock, which stops while the machine is suspended.
func TestNowHasNoMonotonicReading(t *testing.T) {
	now := Now()
	if now != now.Round(0) {
		t.Fatal("Now() carries a monotonic reading")
	}
	if d := Now().Sub(time.Now()); d < -time.Minute || d > time.Minute {
		t.Fatalf("Now() is %s from the wall clock, right after this process started", d)
	}
}
