package main

import (
	"fmt"
	"math"
)

// The capacity model's assumptions: what a deployment chooses, not what
// this run measures. Every per-request input is measured (costs).
const (
	retentionSeconds = 24 * 3600 // Options.TTL's default: every record is kept 24 h
	shardMemory      = 25 << 30  // maxmemory of one Redis primary: 25 GiB (a 32 GiB node with room for a fork's copy-on-write)
	shardCPU         = 0.5       // the share of its one command thread a primary may use, leaving room for bursts and failover
	pgCoreUse        = 0.5       // the share of each PostgreSQL core the model lets requests use
	pgServerCores    = 64        // one large PostgreSQL primary
	pgServerStorage  = 8 << 40   // its storage for the records: 8 TiB
	gib              = float64(1 << 30)
)

var modelRates = []float64{10_000, 100_000, 1_000_000}

// redisInputs are the model's measured inputs for Redis: the CPU per
// first request, the largest of the one-at-a-time figure and the loaded
// runs' (a shard that is not busy wakes for each request alone and pays
// more per request than a busy one, which batches), so the model leans on
// no batching it may not get; and the memory per record once the fence
// counters exist, the larger of used_memory's growth (which moves in steps
// as hash tables double) and the keys' MEMORY USAGE.
func redisInputs(c *costs) (cpu, bytes float64, from string) {
	cpu, from = c.redis.storeFirst.cpuMicros, "one request at a time"
	for _, s := range c.shards {
		if v := s.cpuPerRequest(); v > cpu {
			cpu, from = v, fmt.Sprintf("the %d-shard run", s.shards)
		}
	}
	return cpu, max(c.redis.storeFirst.recordBytes, c.redis.storeFirst.recordUsage), from
}

func (r *report) capacity(c *costs) {
	r.section("Capacity model: keyed requests per second with 24 h retention")
	r.note(fmt.Sprintf("assumptions (chosen, not measured): every keyed request is a first request with a new key, kept 24 h; "+
		"a Redis primary has maxmemory %.0f GiB and may use %.0f%% of its command thread; PostgreSQL cores run at %.0f%%; "+
		"one PostgreSQL primary has at most %d cores and %.0f TiB for the records. Replicas double memory and nodes, not primaries.\n",
		shardMemory/gib, 100*shardCPU, 100*pgCoreUse, pgServerCores, float64(pgServerStorage)/(1<<40)))
	if c.redis == nil && c.pg == nil {
		r.skip("capacity table", "neither Redis nor PostgreSQL was measured")
		return
	}
	if c.redis != nil {
		cpu, bytes, from := redisInputs(c)
		r.note(fmt.Sprintf("\nRedis inputs (measured above): %.1f µs of Redis CPU per first request (%s), %.0f bytes per record (the larger of used_memory growth and MEMORY USAGE, fence counters left out), %.2f round trips.\n\n",
			cpu, from, bytes, c.redis.storeFirst.roundTrips))
		var rows [][]string
		for _, rate := range modelRates {
			records := rate * retentionSeconds
			mem := records * bytes
			byMem := math.Ceil(mem / shardMemory)
			byCPU := math.Ceil(rate * cpu / 1e6 / shardCPU)
			limit := "memory"
			if byCPU > byMem {
				limit = "CPU"
			}
			rows = append(rows, []string{rateText(rate), fmt.Sprintf("%.3g", records), fmt.Sprintf("%.0f GiB", mem/gib),
				f0(byMem), f0(byCPU), f0(max(byMem, byCPU)), limit})
		}
		r.table([]string{"keyed requests/s", "records kept", "memory (used_memory)", "primaries for memory", "primaries for CPU", "Redis Cluster primaries", "first limit"}, rows)
		if len(c.shards) > 0 {
			r.note(fmt.Sprintf("\ncheck: the model gives one primary %.0f first requests/s at %.0f%% of its thread (%.0f at 100%%); the runs above:",
				1e6*shardCPU/cpu, 100*shardCPU, 1e6/cpu))
			for _, s := range c.shards {
				lo, hi := s.spread()
				r.note(fmt.Sprintf(" %d shard(s): %.1f µs per request, %.0f requests/s per shard at 100%% CPU, keys %.2f–%.2f of an even share;",
					s.shards, s.cpuPerRequest(), s.rate()/float64(s.shards)/s.busiest(), lo, hi))
			}
			r.note("\n")
		}
	}
	if c.pg != nil {
		p := c.pg.storeFirst
		cpuNote := "backend CPU not measured (the server is not on this machine)"
		if c.pg.local {
			cpuNote = fmt.Sprintf("%.1f µs of backend CPU", p.cpuMicros)
		}
		r.note(fmt.Sprintf("\nPostgreSQL inputs (measured above): %s, %.0f WAL bytes, %.2f row versions, %.0f bytes of table and index, %.2f round trips per first request. "+
			"Not counted: the background writer, checkpointer, autovacuum, and the cleanup's DELETE of each expired record.\n\n",
			cpuNote, p.walBytes, p.rows, p.bytes, p.roundTrips))
		var rows [][]string
		for _, rate := range modelRates {
			records := rate * retentionSeconds
			storage := records * p.bytes
			cores := math.NaN()
			coresText := "—"
			if c.pg.local {
				cores = math.Ceil(rate * p.cpuMicros / 1e6 / pgCoreUse)
				coresText = f0(cores)
			}
			limit := "fits one primary"
			switch byCores, byStorage := cores/pgServerCores, storage/pgServerStorage; {
			case byCores > 1 && byCores >= byStorage:
				limit = "cores: more than one primary"
			case byStorage > 1:
				limit = "storage: more than one primary"
			}
			rows = append(rows, []string{rateText(rate), fmt.Sprintf("%.3g", records), fmt.Sprintf("%.0f GiB", storage/gib),
				coresText, fmt.Sprintf("%.0f MB/s", rate*p.walBytes/1e6), f0(rate * p.rows), limit})
		}
		r.table([]string{"keyed requests/s", "records kept", "table and index", "cores", "WAL", "row versions/s", "first limit"}, rows)
	}
}

func rateText(rate float64) string {
	if rate >= 1e6 {
		return f0(rate/1e6) + "M"
	}
	return f0(rate/1e3) + "k"
}
