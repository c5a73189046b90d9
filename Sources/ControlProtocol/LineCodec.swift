import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// JSON lines: one value per line, no pretty printing, dates as ISO 8601.
public enum LineCodec {
    /// One encoder for every line (its options are fixed; encoding is safe from any thread).
    /// A new encoder per line, with Foundation's `.iso8601` dates (a calendar and time zone
    /// behind each date), was most of what the daemon's event stream cost: with 32 cards
    /// every job event and progress report became a line for each watcher (issue 18).
    private static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.dateEncodingStrategy = .custom { date, encoder in
            var c = encoder.singleValueContainer()
            try c.encode(iso8601(date))
        }
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return e
    }()

    public static func encode<T: Encodable>(_ value: T) throws -> Data {
        var d = try encoder.encode(value)
        d.append(0x0A)
        return d
    }

    public static func decode<T: Decodable>(_ type: T.Type, from line: Data) throws -> T {
        let d = JSONDecoder()
        d.dateDecodingStrategy = .iso8601
        return try d.decode(type, from: line)
    }

    /// "2026-11-30T00:56:19Z": what `.iso8601` writes (UTC, whole seconds), from `gmtime_r`.
    public static func iso8601(_ date: Date) -> String {
        var text: [UInt8] = []
        iso8601(date, into: &text)
        return String(decoding: text, as: UTF8.self)
    }

    /// `value` (0 ≤ value < 10^count) in `count` decimal digits, zero-padded, appended to
    /// `bytes`: the fixed-width fields of the dates the event lines and the ledger write.
    public static func appendDigits(_ value: Int, count: Int, to bytes: inout [UInt8]) {
        var divisor = 1
        for _ in 1..<count { divisor *= 10 }
        var v = value
        while divisor > 0 {
            bytes.append(UInt8(ascii: "0") + UInt8(v / divisor))
            v %= divisor
            divisor /= 10
        }
    }

    /// The same, appended to `bytes` (the event stream's lines write it in place).
    static func iso8601(_ date: Date, into bytes: inout [UInt8]) {
        var t = time_t(date.timeIntervalSince1970.rounded(.down))
        var tm = tm()
        gmtime_r(&t, &tm)
        func digits(_ v: Int, _ count: Int) { appendDigits(v, count: count, to: &bytes) }
        let year = Int(tm.tm_year) + 1900
        if (0...9999).contains(year) { digits(year, 4) } else { bytes.append(contentsOf: String(year).utf8) }
        bytes.append(UInt8(ascii: "-")); digits(Int(tm.tm_mon) + 1, 2)
        bytes.append(UInt8(ascii: "-")); digits(Int(tm.tm_mday), 2)
        bytes.append(UInt8(ascii: "T")); digits(Int(tm.tm_hour), 2)
        bytes.append(UInt8(ascii: ":")); digits(Int(tm.tm_min), 2)
        bytes.append(UInt8(ascii: ":")); digits(Int(tm.tm_sec), 2)
        bytes.append(UInt8(ascii: "Z"))
    }
}
