import Foundation

/// Sizes as people write them (in configs, on the command line) and as we show them.
///
/// K, M, G, T (with or without `iB`) are powers of 1024, as sfdisk, dd and the kernel read them;
/// KB, MB, GB, TB are powers of 1000, as SD card packaging means them. A bare number is bytes.
public enum ByteCount {
    public struct ParseError: Error, CustomStringConvertible, Sendable, Equatable {
        public var text: String
        public var description: String {
            "not a size: \"\(text)\" (write e.g. 4096, \"8KiB\", \"512MiB\", \"2GiB\", \"1G\" or \"32GB\")"
        }
    }

    /// "512MiB", "2 GiB", "1G", "32GB", "4096" → bytes. Whole numbers only, and no overflow.
    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        let unit = trimmed.dropFirst(digits.count).trimmingCharacters(in: .whitespaces)
        guard !digits.isEmpty, let number = UInt64(digits) else { throw ParseError(text: text) }
        let multiplier: UInt64
        switch unit.uppercased() {
        case "", "B": multiplier = 1
        case "K", "KIB": multiplier = 1 << 10
        case "M", "MIB": multiplier = 1 << 20
        case "G", "GIB": multiplier = 1 << 30
        case "T", "TIB": multiplier = 1 << 40
        case "KB": multiplier = 1_000
        case "MB": multiplier = 1_000_000
        case "GB": multiplier = 1_000_000_000
        case "TB": multiplier = 1_000_000_000_000
        default: throw ParseError(text: text)
        }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw ParseError(text: text) }
        return bytes
    }

    /// For a person reading a screen: "29.7 GiB", "512 MiB", "4096 B".
    public static func human(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(bytes)
        var i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        if i == 0 { return "\(bytes) B" }
        return v >= 100 || v == v.rounded() ? String(format: "%.0f %@", v, units[i]) : String(format: "%.1f %@", v, units[i])
    }

    /// Exact where possible, for error messages about offsets and lengths: 8192 → "8 KiB",
    /// 1048576 → "1 MiB", 1000 → "1000 bytes".
    public static func exact(_ bytes: UInt64) -> String {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] where bytes >= (1 << shift) {
            if bytes % (1 << shift) == 0 { return "\(bytes >> shift) \(unit)" }
        }
        return "\(bytes) bytes"
    }
}
