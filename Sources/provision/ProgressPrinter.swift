import BlockDevices
import Foundation
import ImageIO

/// Shows a write's progress the way the reader can use it: a live bar on a terminal, a
/// line every few seconds in a log, or JSON objects for scripts.
final class ProgressPrinter: @unchecked Sendable {
    enum Mode { case terminal, lines, json }
    let mode: Mode
    private let lock = NSLock()
    private var lastLine = Date.distantPast
    private var lastPhase: WritePhase?
    private var finishedPhases: Set<WritePhase> = []
    /// When the first downloaded byte was seen, for the download's own rate.
    private var downloadStarted: (at: Date, bytes: UInt64)?
    private let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    init(mode: Mode) { self.mode = mode }

    private func err(_ s: String) { FileHandle.standardError.write(Data(s.utf8)) }
    private func out(_ line: Data) { FileHandle.standardOutput.write(line + Data("\n".utf8)) }

    func note(_ message: String) {
        lock.withLock {
            switch mode {
            case .json: emit(["event": "note", "message": message])
            default: err(message + "\n")
            }
        }
    }

    func progress(_ p: WriteProgress) {
        lock.withLock {
            switch mode {
            case .json:
                struct Event: Encodable { let event = "progress"; let progress: WriteProgress }
                if let d = try? encoder.encode(Event(progress: p)) { out(d) }
            case .terminal:
                let width = 30
                let f = p.fraction ?? 0
                let bar = String(repeating: "#", count: Int(f * Double(width))) + String(repeating: "-", count: width - Int(f * Double(width)))
                let total = p.bytesTotal.map { " / " + ByteCount.human($0) } ?? ""
                let eta = p.secondsRemaining.map { " ETA " + Self.clock($0) } ?? ""
                let rate = p.bytesPerSecond > 0 ? " " + Self.megabytesPerSecond(p.bytesPerSecond) : ""
                err(String(format: "\r\u{1B}[K%-9@ [%@] %3.0f%% %@%@%@%@%@", p.phase.rawValue, bar, f * 100, ByteCount.human(p.bytesDone), total, rate, eta, downloadText(p)))
                lastPhase = p.phase
            case .lines:
                // `done` is said by `finish`, with the totals.
                guard p.phase != .done else { return }
                // Each phase's start, its end (100 %, so a log shows writing finish before
                // syncing begins), and a line every 2 s between.
                let finished = p.fraction == 1 && !finishedPhases.contains(p.phase)
                if p.phase != lastPhase || finished || Date().timeIntervalSince(lastLine) >= 2 {
                    lastLine = Date()
                    lastPhase = p.phase
                    if p.fraction == 1 { finishedPhases.insert(p.phase) }
                    err(Self.line(p) + downloadText(p) + "\n")
                }
            }
        }
    }

    func finish(result: WriteResult, device: String) {
        lock.withLock {
            if mode == .terminal { err("\n") }
            switch mode {
            case .json:
                struct Final: Encodable { let event = "result"; let ok = true; let device: String; let result: WriteResult }
                if let d = try? encoder.encode(Final(device: device, result: result)) { out(d) }
            default:
                err(Self.summary(result, device: device) + "\n")
            }
        }
    }

    func fail(message: String, code: String) {
        lock.withLock {
            if mode == .terminal { err("\n") }
            switch mode {
            case .json: emit(["event": "result", "ok": "false", "error": code, "message": message])
            default: err("provision: error: \(message)\n")
            }
        }
    }

    /// " · downloaded 12.0 MiB of 40.0 MiB (30%) at 5.2 MB/s" for an image read over HTTP
    /// (the write's pace is the download's; its ETA already counts the download), else "".
    private func downloadText(_ p: WriteProgress) -> String {
        guard let received = p.bytesDownloaded else { return "" }
        let now = Date()
        if downloadStarted == nil, received > 0 { downloadStarted = (now, received) }
        var text = " · downloaded \(ByteCount.human(received))"
        if let total = p.downloadTotal, total > 0 {
            text += " of \(ByteCount.human(total)) (\(Int(Double(received) / Double(total) * 100))%)"
        }
        if let start = downloadStarted, now.timeIntervalSince(start.at) >= 0.5, received > start.bytes {
            text += " at " + Self.megabytesPerSecond(Double(received - start.bytes) / now.timeIntervalSince(start.at))
        }
        return text
    }

    private func emit(_ object: [String: String]) {
        if let d = try? encoder.encode(object) { out(d) }
    }

    /// One progress line off a terminal: "writing 50% 64 MiB of 128 MiB 21.3 MB/s". The
    /// rate only where one was measured: a sync has no rate, and a phase that has just begun
    /// (or ended within a blink) has none yet.
    static func line(_ p: WriteProgress) -> String {
        let pct = p.fraction.map { String(format: " %.0f%%", $0 * 100) } ?? ""
        let rate = p.bytesPerSecond > 0 ? " " + megabytesPerSecond(p.bytesPerSecond) : ""
        return "\(p.phase.rawValue)\(pct) \(ByteCount.human(p.bytesDone))\(p.bytesTotal.map { " of " + ByteCount.human($0) } ?? "")\(rate)"
    }

    /// The closing line. Times are shown to the precision they have ("0.04 s", not "0.0 s");
    /// read-back runs during the write, so what is left of it at the end is often nothing.
    static func summary(_ result: WriteResult, device: String) -> String {
        let seconds = result.writeSeconds + result.syncSeconds
        let rate = seconds >= 0.01 ? " (\(megabytesPerSecond(Double(result.bytesWritten) / seconds)))" : ""
        var text = "done: wrote \(ByteCount.human(result.bytesWritten)) to \(device) in \(duration(seconds))\(rate)"
        if !result.verified {
            text += ", NOT verified (--no-verify)"
        } else if result.verifySeconds < 0.005 {
            text += ", verified: every written byte read back and compared while writing"
        } else {
            text += ", verified: every written byte read back and compared, \(duration(result.verifySeconds)) after the last write"
        }
        return text
    }

    static func duration(_ seconds: Double) -> String {
        seconds >= 10 ? String(format: "%.0f s", seconds) : seconds >= 0.1 ? String(format: "%.1f s", seconds) : String(format: "%.2f s", seconds)
    }

    static func megabytesPerSecond(_ bytesPerSecond: Double) -> String {
        bytesPerSecond >= 100e6 ? String(format: "%.0f MB/s", bytesPerSecond / 1e6) : String(format: "%.1f MB/s", bytesPerSecond / 1e6)
    }

    static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}
