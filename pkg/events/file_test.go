package events

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// TestFileRotates: records go to path until the next one would pass MaxBytes; then the files move
// along (at most Keep old ones), and every record is whole in exactly one file.
func TestFileRotates(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "decisions.jsonl")
	l, err := OpenFile(path, 600, 2)
	if err != nil {
		t.Fatal(err)
	}
	const n = 40
	for i := range n {
		if err := l.Write(Decision{DecisionID: fmt.Sprintf("d%02d", i), Kind: "connect4", Verdict: "deny"}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	seen := map[string]bool{}
	for _, p := range []string{path, path + ".1", path + ".2"} {
		f, err := os.Open(p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		st, _ := f.Stat()
		if st.Size() > 600 {
			t.Errorf("%s is %d bytes, over the limit", p, st.Size())
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var d Decision
			if err := json.Unmarshal(sc.Bytes(), &d); err != nil {
				t.Fatalf("%s: a torn record: %q", p, sc.Text())
			}
			seen[d.DecisionID] = true
		}
		f.Close()
	}
	if _, err := os.Stat(path + ".3"); !os.IsNotExist(err) {
		t.Errorf("more than 2 old files kept")
	}
	if !seen[fmt.Sprintf("d%02d", n-1)] || seen["d00"] {
		t.Errorf("want the newest records kept and the oldest rotated away: %v", seen)
	}
}

// TestFileBuffersUntilFlush: records wait in the buffer until Flush, then are in the file whole.
func TestFileBuffersUntilFlush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	l, err := OpenFile(path, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.Write(Decision{DecisionID: "a"})
	if b, _ := os.ReadFile(path); len(b) != 0 {
		t.Fatalf("written before Flush: %q", b)
	}
	l.Flush()
	if b, _ := os.ReadFile(path); !strings.HasPrefix(string(b), `{"decision_id":"a"`) || !strings.HasSuffix(string(b), "}\n") {
		t.Fatalf("after Flush: %q", b)
	}
}

// TestPumpCountsRecordsOfAFailedFlush: when the buffered write fails, every record it held is
// counted lost, not one.
func TestPumpCountsRecordsOfAFailedFlush(t *testing.T) {
	l, err := OpenFile(filepath.Join(t.TempDir(), "decisions.jsonl"), 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	l.f.Close() // every write fails from now on
	src := &sliceSource{events: []dataplane.Event{{Slot: 1}, {Slot: 1}, {Slot: 1}}}
	p := NewPump(src, attr{}, 10, slog.New(slog.DiscardHandler), l)
	p.Run(errClosed)
	if st := p.Stats(); st.Written != 3 || st.SinkErrors != 3 {
		t.Errorf("stats %+v: want 3 written to the sinks and 3 lost by the file", st)
	}
}

// TestEmitIsWrittenAtOnce: a record tetherd emits itself (a kill) is in the file when Emit
// returns, not held in the buffer until the next kernel event.
func TestEmitIsWrittenAtOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "decisions.jsonl")
	l, err := OpenFile(path, 0, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	p := NewPump(&sliceSource{}, attr{}, 10, slog.New(slog.DiscardHandler), l)
	p.Emit(Decision{Kind: "kill"})
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), `"kind":"kill"`) {
		t.Fatalf("after Emit the file holds %q", b)
	}
}
