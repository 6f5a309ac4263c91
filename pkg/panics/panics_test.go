package panics

import (
	"errors"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	b := Declare("test boundary")
	if n, ok := Counts()[b]; !ok || n != 0 {
		t.Fatalf("a declared boundary's count: %d %v", n, ok)
	}
	if err := Run(b, func() error { return errors.New("plain") }); err == nil || err.Error() != "plain" {
		t.Errorf("an error passes through: %v", err)
	}
	err := Run(b, func() error {
		var m map[string]int
		m["x"] = 1 // a nil map write panics
		return nil
	})
	var pe *Error
	if !errors.As(err, &pe) || pe.Boundary != b || !strings.Contains(err.Error(), "nil map") || len(pe.Stack) == 0 {
		t.Errorf("a panic: %v", err)
	}
	if Counts()[b] != 1 {
		t.Errorf("count %d, want 1", Counts()[b])
	}
}

func TestCatch(t *testing.T) {
	f := func() (err error) {
		defer Catch("catch", &err)
		panic("boom")
	}
	if err := f(); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Errorf("Catch: %v", err)
	}
	if Counts()["catch"] != 1 {
		t.Errorf("count %d", Counts()["catch"])
	}
}
