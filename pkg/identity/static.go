package identity

import (
	"fmt"
	"path"
	"strconv"
	"strings"
)

// StaticRule names the SPIFFE ID of the agents it selects. Every selector it sets must match:
// Cgroup, a path.Match pattern on the cgroup's path below the cgroup2 root ("agents/build-*");
// Unit, a pattern on the systemd unit whose cgroup it is ("agent-*.service"); UID, the real uid
// of the cgroup's first process.
type StaticRule struct {
	ID     string
	Cgroup string
	Unit   string
	UID    *uint32
}

// Workload is what the resolvers know of a cgroup that got processes.
type Workload struct {
	Cgroup string // below the cgroup2 root, with a leading slash
	PID    int    // its first process
	UID    uint32 // the real uid of PID
}

// Unit is the systemd unit (service or scope) whose cgroup this is, or "".
func (w Workload) Unit() string {
	base := path.Base(w.Cgroup)
	if strings.HasSuffix(base, ".service") || strings.HasSuffix(base, ".scope") {
		return base
	}
	return ""
}

// Static maps workloads to SPIFFE IDs by rules.
type Static struct{ rules []StaticRule }

// NewStatic checks rules: a valid SPIFFE ID and at least one valid selector each.
func NewStatic(rules []StaticRule) (*Static, error) {
	for i, r := range rules {
		if _, err := Parse(r.ID); err != nil {
			return nil, fmt.Errorf("static rule %d: %w", i, err)
		}
		if r.Cgroup == "" && r.Unit == "" && r.UID == nil {
			return nil, fmt.Errorf("static rule %d (%s): it selects nothing: set cgroup, unit or uid", i, r.ID)
		}
		for _, p := range []string{r.Cgroup, r.Unit} {
			if _, err := path.Match(p, ""); err != nil {
				return nil, fmt.Errorf("static rule %d (%s): pattern %q: %w", i, r.ID, p, err)
			}
		}
	}
	return &Static{rules: rules}, nil
}

// Resolve returns the SPIFFE ID the rules give w and the selectors that matched, or "" when no
// rule matches. Rules that match with different IDs are a conflict: an error, not a guess.
func (s *Static) Resolve(w Workload) (id string, selectors []string, err error) {
	for i, r := range s.rules {
		sel, ok := r.match(w)
		if !ok {
			continue
		}
		switch {
		case id == "":
			id, selectors = r.ID, sel
		case r.ID != id:
			return "", nil, fmt.Errorf("cgroup %s: static rules give two identities, %s and %s (rule %d): fix the rules", w.Cgroup, id, r.ID, i)
		}
	}
	return id, selectors, nil
}

func (r StaticRule) match(w Workload) ([]string, bool) {
	var sel []string
	if r.Cgroup != "" {
		if ok, _ := path.Match(strings.TrimPrefix(r.Cgroup, "/"), strings.TrimPrefix(w.Cgroup, "/")); !ok {
			return nil, false
		}
		sel = append(sel, "static:cgroup:"+r.Cgroup)
	}
	if r.Unit != "" {
		u := w.Unit()
		if ok, _ := path.Match(r.Unit, u); u == "" || !ok {
			return nil, false
		}
		sel = append(sel, "static:unit:"+u)
	}
	if r.UID != nil {
		if *r.UID != w.UID {
			return nil, false
		}
		sel = append(sel, "static:uid:"+strconv.FormatUint(uint64(w.UID), 10))
	}
	return sel, true
}
