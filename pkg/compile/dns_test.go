package compile

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tether-sh/tether/internal/dnstest"
)

// TestDNS asks a real DNS server on loopback.
func TestDNS(t *testing.T) {
	srv := dnstest.Start(t)
	srv.Set("api.example.test", 2, netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7"))
	r := NewDNS(srv.Addr)
	ctx := context.Background()
	addrs, ttl, err := r.Lookup(ctx, "API.example.test")
	if err != nil || len(addrs) != 2 || ttl != 2*time.Second {
		t.Fatalf("%v %v %v", addrs, ttl, err)
	}
	// Answered from the cache while the TTL lasts.
	before := srv.Queries()
	if _, _, err := r.Lookup(ctx, "api.example.test"); err != nil || srv.Queries() != before {
		t.Errorf("second lookup asked the server: %v", err)
	}
	// After it, asked again: the record changed.
	srv.Set("api.example.test", 60, netip.MustParseAddr("192.0.2.8"))
	time.Sleep(2100 * time.Millisecond)
	addrs, _, err = r.Lookup(ctx, "api.example.test")
	if err != nil || len(addrs) != 1 || addrs[0] != netip.MustParseAddr("192.0.2.8") {
		t.Errorf("after the TTL: %v %v", addrs, err)
	}
	if _, _, err := r.Lookup(ctx, "nope.example.test"); err == nil || !strings.Contains(err.Error(), "no such name") {
		t.Errorf("missing name: %v", err)
	}
	if _, _, err := r.Lookup(ctx, "bad name!"); err == nil {
		t.Error("a malformed name resolved")
	}
}
