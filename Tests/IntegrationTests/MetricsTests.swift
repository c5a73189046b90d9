import ControlProtocol
import Foundation
import Testing
import TestSupport

extension IntegrationTests {
    /// `provision metrics` (issue 18): the daemon's numbers in Prometheus' text format, over the
    /// control socket, accepted by Prometheus' own checker and counting what really happened.
    @Suite("metrics")
    struct MetricsTests {
        /// One sample line: `name{a="x",b="y"} value`. Parsed here with its own few lines (not
        /// by swift-prometheus, which wrote it), after promtool has accepted the whole text.
        struct Sample: CustomStringConvertible {
            var name: String
            var labels: [String: String]
            var value: Double
            var description: String { "\(name)\(labels.sorted { $0.key < $1.key }) \(value)" }
        }

        static func samples(_ text: String) throws -> [Sample] {
            try text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.isEmpty }.map { line in
                guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                    throw BenchError("not a sample line: \(line)")
                }
                let series = line[..<space]
                guard let brace = series.firstIndex(of: "{") else { return Sample(name: String(series), labels: [:], value: value) }
                var labels: [String: String] = [:]
                // Our label values hold no quotes or commas (station and slot names, outcomes).
                for pair in series[series.index(after: brace)..<series.index(before: series.endIndex)].split(separator: ",") {
                    let parts = pair.split(separator: "=", maxSplits: 1)
                    guard parts.count == 2 else { throw BenchError("bad label \(pair) in \(line)") }
                    labels[String(parts[0])] = String(parts[1].dropFirst().dropLast())
                }
                return Sample(name: String(series[..<brace]), labels: labels, value: value)
            }
        }

        /// The one sample of `name` whose labels include `labels`.
        static func value(_ samples: [Sample], _ name: String, _ labels: [String: String] = [:],
                          sourceLocation: SourceLocation = #_sourceLocation) -> Double? {
            let matching = samples.filter { s in s.name == name && labels.allSatisfy { s.labels[$0.key] == $0.value } }
            #expect(matching.count == 1, "\(name)\(labels): \(matching.count) samples in \(samples)", sourceLocation: sourceLocation)
            return matching.first?.value
        }

        /// `provision metrics`, checked by `promtool check metrics` (which also lints: HELP
        /// text, `_total` on counters, unit suffixes); its exit status fails the test.
        static func scrape(_ bench: StationBench, sourceLocation: SourceLocation = #_sourceLocation) throws -> [Sample] {
            let output = try bench.cli(["metrics"])
            try #require(output.succeeded, "provision metrics: \(output)", sourceLocation: sourceLocation)
            let check = try Command.run(["promtool", "check", "metrics"], input: output.stdout, timeout: .seconds(30))
            #expect(check.succeeded, "promtool check metrics: \(check.stdout)\(check.stderr)\n\(output.stdout)", sourceLocation: sourceLocation)
            let samples = try samples(output.stdout)
            let station = "integration-\(bench.token)"
            #expect(samples.allSatisfy { $0.labels["station"] == station }, "a series without station=\(station): \(samples)",
                    sourceLocation: sourceLocation)
            return samples
        }

        @Test("a written card and a refused one are counted: cards, bytes, speed, duration, running jobs; promtool accepts the text")
        func writtenAndRefusedCardsAreCounted() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let imageBytes = 6 << 20
            let image = try bench.image("card.img", bytes: imageBytes)
            try bench.writeConfig([.init(name: "OK", image: image), .init(name: "RO", image: image)])
            try bench.startDaemon()

            // A fresh daemon shows its series at zero (a rate over a series that appears with its
            // first card would miss that card), and every slot with no job running.
            let fresh = try Self.scrape(bench)
            #expect(Self.value(fresh, "provision_cards_total", ["outcome": "done"]) == 0)
            #expect(Self.value(fresh, "provision_cards_refused_total") == 0)
            #expect(Self.value(fresh, "provision_bytes_written_total") == 0)
            #expect(Self.value(fresh, "provision_running_jobs", ["slot": "OK"]) == 0)
            #expect(Self.value(fresh, "provision_running_jobs", ["slot": "RO"]) == 0)

            try bench.card(slot: "OK", size: 32 << 20)
            let readOnly = try bench.card(slot: "RO", size: 32 << 20, options: .init(readOnly: true))
            let status = try bench.waitForStatus("OK written and RO refused") {
                $0.slot("OK")?.job?.state.isFinal == true && $0.slot("RO")?.refusals != nil
            }
            #expect(status.slot("OK")?.job?.state == .done, "\(bench.log)")

            let after = try Self.scrape(bench)
            #expect(Self.value(after, "provision_cards_total", ["outcome": "done"]) == 1)
            #expect(Self.value(after, "provision_cards_total", ["outcome": "failed"]) == 0)
            #expect(Self.value(after, "provision_cards_refused_total") == 1)
            // A raw image without a bmap is written whole and read back whole.
            #expect(Self.value(after, "provision_bytes_written_total") == Double(imageBytes))
            #expect(Self.value(after, "provision_bytes_verified_total") == Double(imageBytes))
            #expect(Self.value(after, "provision_write_speed_bytes_per_second_count") == 1)
            let speedSum = try #require(Self.value(after, "provision_write_speed_bytes_per_second_sum"))
            #expect(speedSum > 1e6, "an unthrottled loop card writes faster than 1 MB/s: \(speedSum)")
            #expect(Self.value(after, "provision_job_duration_seconds_count", ["outcome": "done"]) == 1)
            let duration = try #require(Self.value(after, "provision_job_duration_seconds_sum", ["outcome": "done"]))
            #expect(duration > 0 && duration < 60, "job duration \(duration) s")
            #expect(Self.value(after, "provision_running_jobs", ["slot": "OK"]) == 0)
            #expect(Self.value(after, "provision_image_cache_limit_bytes") ?? 0 > 0)
            // The card's buffers came from the station's budget and went back to it.
            let limit = try #require(Self.value(after, "provision_buffer_budget_limit_bytes"))
            let peak = try #require(Self.value(after, "provision_buffer_budget_allocated_peak_bytes"))
            #expect(peak > 0 && peak <= limit, "budget peak \(peak) of \(limit)")
            #expect(Self.value(after, "provision_buffer_budget_in_use_bytes") == 0)
            // A count since start is a counter: rate() applies to it.
            #expect(Self.value(after, "provision_buffer_budget_waits_total") == 0)
            let text = try bench.cli(["metrics"]).stdout
            #expect(text.contains("# TYPE provision_buffer_budget_waits_total counter"), "\(text)")

            // Events for a refused card that stays refused do not count it again.
            let watcher = try bench.watch()
            try Udevd.ensureRunning().trigger(readOnly.devicePath, action: "change")
            try bench.waitForEvent(watcher, "the change event on RO to be judged") { $0.device?.device == readOnly.devicePath }
            #expect(Self.value(try Self.scrape(bench), "provision_cards_refused_total") == 1)
        }

        @Test("a running job shows in its slot's gauge while it writes")
        func runningJobIsShownPerSlot() throws {
            let bench = try StationBench()
            defer { bench.close() }
            let image = try bench.image("card.img", bytes: 24 << 20)
            try bench.writeConfig([.init(name: "SLOW", image: image), .init(name: "IDLE", image: image)])
            // A throttled card keeps its job running long enough to be scraped mid-write; it is
            // in before the daemon starts, so the throttle is set before the first byte.
            let card = try bench.card(slot: "SLOW", size: 64 << 20)
            try card.throttle(writeBytesPerSecond: 4 << 20)
            try bench.startDaemon()
            try bench.waitForStatus("SLOW to start writing") { $0.slot("SLOW")?.job?.state == .writing }
            let during = try Self.scrape(bench)
            #expect(Self.value(during, "provision_running_jobs", ["slot": "SLOW"]) == 1)
            #expect(Self.value(during, "provision_running_jobs", ["slot": "IDLE"]) == 0)
            #expect(Self.value(during, "provision_cards_total", ["outcome": "done"]) == 0)
            try bench.waitForStatus("SLOW to finish", timeout: .seconds(120)) { $0.slot("SLOW")?.job?.state.isFinal == true }
            let after = try Self.scrape(bench)
            #expect(Self.value(after, "provision_running_jobs", ["slot": "SLOW"]) == 0)
            #expect(Self.value(after, "provision_cards_total", ["outcome": "done"]) == 1)
        }
    }
}
