import ControlProtocol
import Foundation
import ImageIO
import Pipeline
import Prometheus

/// The station's numbers for a lab's monitoring (issue 18), in Prometheus' text format.
///
/// Each station owns its own registry (not swift-metrics' process-wide bootstrap): a test runs
/// several stations in one process, and a global factory would mix their series. Every series
/// carries `station`, so the scrapes of several stations merge without clashes. Counters count
/// since the daemon started (Prometheus handles the reset at a restart); gauges that describe
/// the present (running jobs, cache) are set when scraped, from the station's own state.
struct StationMetrics {
    let registry = PrometheusCollectorRegistry()
    let station: String
    /// Bytes each running job has written and verified so far, from its progress reports:
    /// a failed or cancelled job's bytes count too (they went to a card).
    private var inFlight: [Int64: (written: UInt64, verified: UInt64)] = [:]
    /// The slot labels `running_jobs` was last emitted with: a slot a reload removed is
    /// unregistered, not left showing its last count.
    private var runningSlots: Set<String> = []
    /// The budget's wait count already added to `buffer_budget_waits_total`.
    private var budgetWaitsCounted = 0

    /// Job durations: a card takes from seconds (a small image) to an hour (a slow 64 GB card).
    static let durationBuckets: [Double] = [5, 15, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200]
    /// Write speeds in bytes per second: cheap SD cards write at 5–20 MB/s, good ones at 90.
    static let speedBuckets: [Double] = [2e6, 5e6, 10e6, 20e6, 40e6, 60e6, 90e6, 150e6, 300e6, 1e9]

    init(station: String) {
        self.station = station
        // Registered at start so a scrape of a fresh daemon shows every series at zero
        // (a rate() over a series that appears only with its first card loses that card).
        for outcome in ["done", "failed", "cancelled"] { _ = cards(outcome); _ = duration(outcome) }
        _ = writeSpeed
        _ = refused
        _ = bytes("written")
        _ = bytes("verified")
        _ = budgetWaits
    }

    private var labels: [(String, String)] { [("station", station)] }

    private func cards(_ outcome: String) -> Counter {
        registry.makeCounter(descriptor: .init(namespace: "provision", metricName: "cards", unitName: "total",
                                               helpText: "Cards whose job ended, by outcome (done, failed, cancelled)."),
                             labels: labels + [("outcome", outcome)])
    }

    private var refused: Counter {
        registry.makeCounter(descriptor: .init(namespace: "provision", metricName: "cards_refused", unitName: "total",
                                               helpText: "Cards in a slot (or asked for by a manual flash) that the safety policy refused to write."),
                             labels: labels)
    }

    private func bytes(_ what: String) -> Counter {
        registry.makeCounter(descriptor: .init(namespace: "provision", metricName: "bytes_\(what)", unitName: "total",
                                               helpText: "Bytes \(what) on cards, by every job including failed ones."),
                             labels: labels)
    }

    private var writeSpeed: ValueHistogram {
        registry.makeValueHistogram(descriptor: .init(namespace: "provision", metricName: "write_speed", unitName: "bytes_per_second",
                                                      helpText: "Average write speed of each finished card's write phase."),
                                    labels: labels, buckets: Self.speedBuckets)
    }

    private var budgetWaits: Counter {
        registry.makeCounter(descriptor: .init(namespace: "provision", metricName: "buffer_budget_waits", unitName: "total",
                                               helpText: "Times a card waited for room in the buffer budget."),
                             labels: labels)
    }

    private func duration(_ outcome: String) -> ValueHistogram {
        registry.makeValueHistogram(descriptor: .init(namespace: "provision", metricName: "job_duration", unitName: "seconds",
                                                      helpText: "Time from a card's job start to its end, by outcome."),
                                    labels: labels + [("outcome", outcome)], buckets: Self.durationBuckets)
    }

    // MARK: - Events

    mutating func progress(_ id: Int64, _ p: WriteProgress) {
        var entry = inFlight[id] ?? (0, 0)
        switch p.phase {
        case .writing: entry.written = max(entry.written, p.bytesDone)
        case .verifying: entry.verified = max(entry.verified, p.bytesDone)
        default: break
        }
        inFlight[id] = entry
    }

    func refusedCard() { refused.increment() }

    /// A card job ended in `state`, as the ledger recorded it (the outcome label: a card
    /// pulled mid-write is "failed" there whatever the pipeline said, and so here), with the
    /// pipeline's bytes, speed and duration.
    mutating func finished(_ id: Int64, state: JobState, outcome: CardOutcome, started: Date, now: Date = Date()) {
        let seen = inFlight.removeValue(forKey: id) ?? (0, 0)
        let name = state.rawValue
        var written = seen.written, verified = seen.verified
        switch outcome {
        case .done(let result):
            // The result's numbers are final; progress reports are throttled and may lag.
            written = result.write.bytesWritten
            verified = result.write.verified && state == .done ? result.write.bytesWritten : 0
            if result.write.writeSeconds > 0, state == .done {
                writeSpeed.record(Double(result.write.bytesWritten) / result.write.writeSeconds)
            }
        case .failed(let failure):
            if failure.kind == .refused { refused.increment() }
        case .cancelled:
            break
        }
        cards(name).increment()
        if written > 0 { bytes("written").increment(by: Int64(clamping: written)) }
        if verified > 0 { bytes("verified").increment(by: Int64(clamping: verified)) }
        duration(name).record(max(0, now.timeIntervalSince(started)))
    }

    /// A job ended without a pipeline outcome (its ledger row was refused, say).
    mutating func forget(_ id: Int64) { inFlight.removeValue(forKey: id) }

    // MARK: - Scrape

    /// The text a scraper reads: the present state is set first, then everything is emitted.
    mutating func text(slots: [String], running: [String?], cache: ImageCacheStore?, buffers: BufferBudget.Usage) -> String {
        var perSlot: [String: Int] = [:]
        // Manual flashes outside any slot are counted under slot="", at 0 when there are none
        // (the gauge is set at every scrape: one that is not set keeps its last value).
        for slot in slots + [""] { perSlot[slot] = 0 }
        for slot in running { perSlot[slot ?? "", default: 0] += 1 }
        func gauge(_ slot: String) -> Gauge {
            registry.makeGauge(descriptor: .init(namespace: "provision", metricName: "running_jobs", unitName: "",
                                                 helpText: "Card jobs running now, by slot (\"\" for manual flashes outside the slots)."),
                               labels: labels + [("slot", slot)])
        }
        for slot in runningSlots.subtracting(perSlot.keys) { registry.unregisterGauge(gauge(slot)) }
        for (slot, count) in perSlot { gauge(slot).set(to: Double(count)) }
        runningSlots = Set(perSlot.keys)
        if let cache {
            registry.makeGauge(descriptor: .init(namespace: "provision", metricName: "image_cache", unitName: "bytes",
                                                 helpText: "Disk space the decompressed-image cache takes (allocated blocks)."),
                               labels: labels).set(to: Double(cache.diskUsage))
            registry.makeGauge(descriptor: .init(namespace: "provision", metricName: "image_cache_limit", unitName: "bytes",
                                                 helpText: "The cache's configured size limit."),
                               labels: labels).set(to: Double(cache.limit))
            registry.makeGauge(descriptor: .init(namespace: "provision", metricName: "image_cache_entries", unitName: "",
                                                 helpText: "Decompressed images in the cache."),
                               labels: labels).set(to: Double(cache.entryCount))
        }
        // The station's buffer budget (issue 18): what the cards hold now and at most.
        for (name, value, help) in [
            ("buffer_budget_limit", buffers.limit, "The buffer budget all cards share (buffer_budget)."),
            ("buffer_budget_allocated", buffers.allocated, "Buffer memory allocated from the budget now (held by cards, or idle for reuse)."),
            ("buffer_budget_allocated_peak", buffers.peakAllocated, "The most buffer memory ever allocated from the budget at once: never above the limit."),
            ("buffer_budget_in_use", buffers.handedOut, "Buffer memory cards hold now."),
        ] {
            registry.makeGauge(descriptor: .init(namespace: "provision", metricName: name, unitName: "bytes", helpText: help),
                               labels: labels).set(to: Double(value))
        }
        // A count since start: a counter (rate() over it), brought up to the budget's count.
        if buffers.waits > budgetWaitsCounted {
            budgetWaits.increment(by: Int64(buffers.waits - budgetWaitsCounted))
            budgetWaitsCounted = buffers.waits
        }
        return registry.emitToString()
    }
}
