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
                err(String(format: "\r\u{1B}[K%-9@ [%@] %3.0f%% %@%@ %6.1f MB/s%@", p.phase.rawValue, bar, f * 100, ByteCount.human(p.bytesDone), total, p.bytesPerSecond / 1e6, eta))
                lastPhase = p.phase
            case .lines:
                if p.phase != lastPhase || Date().timeIntervalSince(lastLine) >= 2 {
                    lastLine = Date()
                    lastPhase = p.phase
                    let pct = p.fraction.map { String(format: " %.0f%%", $0 * 100) } ?? ""
                    err("\(p.phase.rawValue)\(pct) \(ByteCount.human(p.bytesDone))\(p.bytesTotal.map { " of " + ByteCount.human($0) } ?? "") \(String(format: "%.1f", p.bytesPerSecond / 1e6)) MB/s\n")
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
                let rate = result.writeSeconds > 0 ? Double(result.bytesWritten) / (result.writeSeconds + result.syncSeconds) / 1e6 : 0
                err("done: wrote \(ByteCount.human(result.bytesWritten)) to \(device) in \(String(format: "%.1f", result.writeSeconds + result.syncSeconds)) s (\(String(format: "%.1f", rate)) MB/s)"
                    + (result.verified ? ", verified in \(String(format: "%.1f", result.verifySeconds)) s" : ", NOT verified (--no-verify)") + "\n")
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

    private func emit(_ object: [String: String]) {
        if let d = try? encoder.encode(object) { out(d) }
    }

    static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}
