import ControlProtocol
import Foundation
import Logging
import ProvisionCShims

/// Logs to journald with structured fields when systemd connected our stderr to the journal
/// (JOURNAL_STREAM), so `journalctl PROVISION_JOB=12` finds one job's story. Metadata keys
/// `job`, `device`, `slot` become PROVISION_JOB, PROVISION_DEVICE, PROVISION_SLOT.
struct JournalLogHandler: LogHandler {
    static var isConnected: Bool { provision_journal_stream_connected() != 0 }

    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        let all = metadata.merging(explicit ?? [:]) { $1 }
        var fields = ["MESSAGE=\(message)", "PRIORITY=\(Self.priority(level))", "SYSLOG_IDENTIFIER=provisiond", "CODE_FILE=\(file)", "CODE_LINE=\(line)"]
        for (key, value) in all.sorted(by: { $0.key < $1.key }) where ["job", "device", "slot"].contains(key) {
            fields.append("PROVISION_\(key.uppercased())=\(value)")
        }
        var cStrings = fields.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        cStrings.withUnsafeMutableBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: buf.count) {
                _ = provision_journal_send($0, Int32(buf.count))
            }
        }
    }

    static func priority(_ level: Logger.Level) -> Int {
        switch level {
        case .trace, .debug: return 7
        case .info: return 6
        case .notice: return 5
        case .warning: return 4
        case .error: return 3
        case .critical: return 2
        }
    }
}

/// Plain lines on stderr when not under systemd: "2026-11-21T05:00:00Z info job 3 done [device=/dev/sdb]".
struct StderrLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        let all = metadata.merging(explicit ?? [:]) { $1 }
        let meta = all.isEmpty ? "" : " [" + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ") + "]"
        let stamp = LineCodec.iso8601(Date())  // a formatter per line was an ICU formatter per line
        FileHandle.standardError.write(Data("\(stamp) \(level) \(message)\(meta)\n".utf8))
    }
}
