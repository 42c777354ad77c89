// A burnguard signal subscriber in Go: the guard's answer for a service that is not in Python.
//
// It follows the compacted burnguard.signals topic from its start (so it knows the current
// state before it answers), validates every record against contracts/signal.schema.json,
// keeps the current signal per Kafka key (a tombstone removes it) and answers
//
//	GET /decide?tenant=acme&feature=summarize            (model_class defaults to premium)
//	-> {"action":"downgrade","may_call":false,"downgrade_to":"standard","budget":"tenant-daily",...}
//
// with the most severe matching signal, as the Python BudgetGuard decides by signals:
// a signal matches when every dimension of its scope (e.g. tenant+feature) has a value in the
// query and the values joined by "/" equal its key; a signal whose window has ended never
// applies; a stale one (past expires_at) is ignored with -fail-mode=open and kept with closed.
// throttle -> deny, downgrade -> downgrade (to the signal's model class), warn and ok -> allow.
//
//	go run . -brokers 127.0.0.1:9092 -schema ../../contracts/signal.schema.json -listen 127.0.0.1:8087
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Signal is the part of a burnguard signal a decision needs (contracts/signals.py).
type Signal struct {
	Scope       string    `json:"scope"`
	Key         string    `json:"key"`
	Budget      string    `json:"budget"`
	Action      string    `json:"action"`
	DowngradeTo *string   `json:"downgrade_to"`
	Metric      string    `json:"metric"`
	Spent       float64   `json:"spent"`
	Limit       float64   `json:"limit"`
	WindowEnd   time.Time `json:"window_end"`
	ExpiresAt   time.Time `json:"expires_at"`
}

// severity orders actions as contracts/budgets.py SEVERITY does.
var severity = map[string]int{"ok": 0, "warn": 1, "downgrade": 2, "throttle": 3}

// Decision is the answer to "may this call go ahead, and on which model class?".
type Decision struct {
	Action       string  `json:"action"`   // allow, downgrade or deny
	MayCall      bool    `json:"may_call"` // on the asked model class, now
	DowngradeTo  *string `json:"downgrade_to,omitempty"`
	Budget       string  `json:"budget,omitempty"`
	Scope        string  `json:"scope,omitempty"`
	Key          string  `json:"key,omitempty"`
	SignalAction string  `json:"signal_action,omitempty"`
}

// State holds the current signal per Kafka key and what was rejected.
type State struct {
	mu       sync.RWMutex
	signals  map[string]Signal
	received int
	rejected int
	ready    bool
}

func (s *State) apply(key string, value []byte, schema *jsonschema.Schema) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if value == nil { // a tombstone: the budget was removed
		delete(s.signals, key)
		return nil
	}
	signal, err := validated(value, schema)
	if err != nil {
		s.rejected++
		return err
	}
	s.received++
	s.signals[key] = signal
	return nil
}

// validated checks the record against the published JSON Schema before reading it.
func validated(value []byte, schema *jsonschema.Schema) (Signal, error) {
	instance, err := jsonschema.UnmarshalJSON(bytes.NewReader(value))
	if err != nil {
		return Signal{}, fmt.Errorf("not JSON: %w", err)
	}
	if err := schema.Validate(instance); err != nil {
		return Signal{}, fmt.Errorf("does not match signal.schema.json: %s", oneLine(err))
	}
	var signal Signal
	if err := json.Unmarshal(value, &signal); err != nil {
		return Signal{}, fmt.Errorf("unreadable: %w", err)
	}
	return signal, nil
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}

// decide applies the most severe current signal that matches the call's dimension values.
func (s *State) decide(values map[string]string, now time.Time, failClosed bool) Decision {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]string, 0, len(s.signals))
	for key := range s.signals {
		keys = append(keys, key)
	}
	sort.Strings(keys) // of two equally severe signals, the answer does not depend on map order
	var worst *Signal
	for _, key := range keys {
		signal := s.signals[key]
		if signal.Action == "ok" || !matches(signal, values) || !now.Before(signal.WindowEnd) {
			continue
		}
		if !now.Before(signal.ExpiresAt) && !failClosed {
			continue
		}
		if worst == nil || severity[signal.Action] > severity[worst.Action] {
			worst = &signal
		}
	}
	return decision(worst, values["model_class"])
}

func matches(signal Signal, values map[string]string) bool {
	dimensions := strings.Split(signal.Scope, "+")
	parts := make([]string, len(dimensions))
	for i, dimension := range dimensions {
		if parts[i] = values[dimension]; parts[i] == "" {
			return false
		}
	}
	return strings.Join(parts, "/") == signal.Key
}

// decision turns the deciding signal into an answer; a call already on the class a downgrade
// goes to needs no cheaper model and is allowed, as the Python guard finds no cheaper rung.
func decision(signal *Signal, modelClass string) Decision {
	if signal == nil {
		return Decision{Action: "allow", MayCall: true}
	}
	d := Decision{Budget: signal.Budget, Scope: signal.Scope, Key: signal.Key, SignalAction: signal.Action}
	switch signal.Action {
	case "throttle":
		d.Action = "deny"
	case "downgrade":
		if signal.DowngradeTo != nil && *signal.DowngradeTo == modelClass {
			d.Action, d.MayCall = "allow", true
		} else {
			d.Action, d.DowngradeTo = "downgrade", signal.DowngradeTo
		}
	default:
		d.Action, d.MayCall = "allow", true
	}
	return d
}

// follow reads the topic from its start; ready is closed once the state at start is replayed.
func follow(ctx context.Context, client *kgo.Client, topic string, state *State, schema *jsonschema.Schema, ready chan<- struct{}) error {
	ends, err := endOffsets(ctx, client, topic)
	if err != nil {
		return err
	}
	markReady := func() {
		state.mu.Lock()
		state.ready = true
		state.mu.Unlock()
		close(ready)
	}
	if len(ends) == 0 {
		markReady()
	}
	for {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil
		}
		fetches.EachError(func(t string, p int32, err error) {
			log.Printf("fetch error on %s[%d]: %v (retrying)", t, p, err)
		})
		fetches.EachRecord(func(r *kgo.Record) {
			if err := state.apply(string(r.Key), r.Value, schema); err != nil {
				log.Printf("rejected signal %q at %s[%d]@%d: %v", r.Key, r.Topic, r.Partition, r.Offset, err)
			}
			if end, ok := ends[r.Partition]; ok && r.Offset+1 >= end {
				delete(ends, r.Partition)
				if len(ends) == 0 {
					markReady()
				}
			}
		})
	}
}

// endOffsets are the offsets to reach before the compacted state is known (empty partitions omitted).
func endOffsets(ctx context.Context, client *kgo.Client, topic string) (map[int32]int64, error) {
	admin := kadm.NewClient(client)
	for {
		listed, err := admin.ListEndOffsets(ctx, topic)
		if err == nil {
			ends := map[int32]int64{}
			var failed error
			listed.Each(func(o kadm.ListedOffset) {
				if o.Err != nil {
					failed = o.Err
				} else if o.Offset > 0 {
					ends[o.Partition] = o.Offset
				}
			})
			if failed == nil && len(listed) > 0 {
				return ends, nil
			}
			err = errors.Join(failed, fmt.Errorf("topic %s not found yet", topic))
		}
		log.Printf("waiting for %s: %v", topic, err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

func compileSchema(path string) (*jsonschema.Schema, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	document, err := jsonschema.UnmarshalJSON(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	compiler := jsonschema.NewCompiler()
	compiler.AssertFormat() // date-time fields are checked, not just typed as strings
	if err := compiler.AddResource(path, document); err != nil {
		return nil, err
	}
	return compiler.Compile(path)
}

func serve(state *State, failClosed bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/decide", func(w http.ResponseWriter, r *http.Request) {
		state.mu.RLock()
		ready := state.ready
		state.mu.RUnlock()
		if !ready {
			http.Error(w, "still replaying the compacted signal topic", http.StatusServiceUnavailable)
			return
		}
		values := map[string]string{"model_class": "premium"} // the question: the premium model, now?
		for name, given := range r.URL.Query() {
			values[name] = given[0]
		}
		writeJSON(w, state.decide(values, time.Now().UTC(), failClosed))
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		state.mu.RLock()
		defer state.mu.RUnlock()
		writeJSON(w, map[string]any{"signals": len(state.signals), "received": state.received, "rejected": state.rejected, "ready": state.ready})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, value any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(value)
}

func envOr(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func main() {
	brokers := flag.String("brokers", envOr("BURNGUARD_KAFKA_BOOTSTRAP", "127.0.0.1:9092"), "Kafka bootstrap servers, comma-separated")
	topic := flag.String("topic", envOr("BURNGUARD_TOPIC_SIGNALS", "burnguard.signals"), "the signal topic")
	schemaPath := flag.String("schema", "contracts/signal.schema.json", "path of burnguard's signal JSON Schema")
	listen := flag.String("listen", "127.0.0.1:8087", "HTTP address to answer on (port 0: any free port)")
	failMode := flag.String("fail-mode", "open", "stale signals: open ignores them, closed keeps their restriction")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.LUTC)
	if *failMode != "open" && *failMode != "closed" {
		log.Fatalf("-fail-mode must be open or closed, not %q", *failMode)
	}
	schema, err := compileSchema(*schemaPath)
	if err != nil {
		log.Fatalf("signal schema: %v", err)
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.ConsumeTopics(*topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err != nil {
		log.Fatalf("kafka client: %v", err)
	}
	defer client.Close()
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	state := &State{signals: map[string]Signal{}}
	ready := make(chan struct{})
	go func() {
		if err := follow(ctx, client, *topic, state, schema, ready); err != nil && ctx.Err() == nil {
			log.Fatalf("following %s: %v", *topic, err)
		}
	}()
	server := &http.Server{Handler: serve(state, *failMode == "closed"), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = server.Serve(listener) }()
	log.Printf("listening on http://%s", listener.Addr())
	select {
	case <-ready:
		log.Printf("ready: replayed %s", *topic)
	case <-ctx.Done():
	}
	<-ctx.Done()
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = server.Shutdown(shutdown)
}
