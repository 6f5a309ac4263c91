package grants

import (
	"encoding/json"
	"testing"
)

func TestPortRangeJSON(t *testing.T) {
	tests := []struct {
		in      string
		want    PortRange
		wantErr bool
	}{
		{`443`, PortRange{443, 443}, false},
		{`"443"`, PortRange{443, 443}, false},
		{`"8000-8100"`, PortRange{8000, 8100}, false},
		{`" 1 - 2 "`, PortRange{1, 2}, false},
		{`"9-1"`, PortRange{}, true},
		{`65536`, PortRange{}, true},
		{`-1`, PortRange{}, true},
		{`"http"`, PortRange{}, true},
		{`"1-2-3"`, PortRange{}, true},
		{`true`, PortRange{}, true},
	}
	for _, tt := range tests {
		var got PortRange
		err := json.Unmarshal([]byte(tt.in), &got)
		if (err != nil) != tt.wantErr || (!tt.wantErr && got != tt.want) {
			t.Errorf("%s: got %v, %v", tt.in, got, err)
		}
	}
	b, _ := json.Marshal([]PortRange{{443, 443}, {8000, 8100}})
	if string(b) != `[443,"8000-8100"]` {
		t.Errorf("marshal: %s", b)
	}
}
