package privtest

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
)

// FaultsEnv runs the fault suite (make test-faults sets it to 1). Its cases stop, kill and starve
// tetherd and what it depends on for seconds to minutes each, so the whole suite (make test) does
// not run them a second time: they skip there, saying so.
const FaultsEnv = "TETHER_FAULTS"

// FaultTableEnv names a file the fault suite appends its table rows to (Markdown).
const FaultTableEnv = "TETHER_FAULT_TABLE"

// Fault is one case of the fault suite: the fault, what must hold, and what was measured.
type Fault struct {
	Case     string
	MustHold string
	Measured string
	// WronglyAllowed counts connects (or packets) that reached a peer they must not have.
	WronglyAllowed int
	// Unaccounted counts kernel decisions that are neither in the decision log nor counted as
	// lost.
	Unaccounted int
}

var faults struct {
	sync.Mutex
	rows []Fault
}

// FaultGate skips a fault case unless the fault suite runs, and applies Gate.
func FaultGate(t testing.TB) {
	t.Helper()
	if os.Getenv(FaultsEnv) != "1" {
		t.Skipf("a case of the fault suite: run with make test-faults (%s=1)", FaultsEnv)
	}
	Gate(t)
}

// RecordFault adds f to the suite's table and fails the test unless nothing was wrongly allowed
// and every record is accounted for.
func RecordFault(t testing.TB, f Fault) {
	t.Helper()
	t.Logf("fault %q: must hold: %s; measured: %s; wrongly allowed %d, records unaccounted %d", f.Case, f.MustHold, f.Measured, f.WronglyAllowed, f.Unaccounted)
	if f.WronglyAllowed != 0 {
		t.Errorf("%s: %d wrongly allowed", f.Case, f.WronglyAllowed)
	}
	if f.Unaccounted != 0 {
		t.Errorf("%s: %d records unaccounted", f.Case, f.Unaccounted)
	}
	if t.Failed() {
		f.Measured += " (FAILED)"
	}
	faults.Lock()
	faults.rows = append(faults.rows, f)
	faults.Unlock()
}

// writeFaults prints the table of the cases that ran, and appends its rows to the file
// FaultTableEnv names.
func writeFaults(w io.Writer) {
	faults.Lock()
	defer faults.Unlock()
	if len(faults.rows) == 0 {
		return
	}
	var b strings.Builder
	for _, f := range faults.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %d | %d |\n", f.Case, f.MustHold, f.Measured, f.WronglyAllowed, f.Unaccounted)
	}
	fmt.Fprintf(w, "\nFault suite:\n| case | must hold | measured | wrongly allowed | records unaccounted |\n|---|---|---|---|---|\n%s", b.String())
	if path := os.Getenv(FaultTableEnv); path != "" {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err == nil {
			_, err = f.WriteString(b.String())
			f.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "writing the fault table:", err)
		}
	}
}
