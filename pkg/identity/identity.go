// Package identity names agents by SPIFFE ID. It is tether's only user of go-spiffe; later stages
// (SPIRE, Kubernetes and static resolvers) live here too.
package identity

import (
	"fmt"
	"path"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Parse checks that s is a valid SPIFFE ID and returns its canonical form.
func Parse(s string) (string, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return "", fmt.Errorf("SPIFFE ID %q: %w", s, err)
	}
	return id.String(), nil
}

// Split returns the trust domain and the path ("/a/b", or "" for none) of the SPIFFE ID s.
func Split(s string) (trustDomain, path string, err error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return "", "", fmt.Errorf("SPIFFE ID %q: %w", s, err)
	}
	return id.TrustDomain().Name(), id.Path(), nil
}

// Match reports whether id matches pattern, a SPIFFE ID in which path.Match wildcards may stand
// for path segments ("spiffe://example.org/agents/*").
func Match(pattern, id string) bool {
	ok, err := path.Match(pattern, id)
	return err == nil && ok
}

// ValidPattern checks a pattern for Match.
func ValidPattern(pattern string) error {
	if _, err := path.Match(pattern, ""); err != nil {
		return fmt.Errorf("SPIFFE ID pattern %q: %w", pattern, err)
	}
	return nil
}
