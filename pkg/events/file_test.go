package events

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
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
