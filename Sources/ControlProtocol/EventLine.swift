import Foundation

/// The event stream's lines, written field by field (issue 18). A `watch` client gets one line
/// per job state change and progress report; with 32 cards, `JSONEncoder` spent ~0.1 ms on
/// each (generic containers, a dictionary per object, sorting its keys), the largest share of
/// the station's own threads. This writes the same bytes `LineCodec.encode` writes — keys in
/// the encoder's sorted order, absent optionals left out, doubles and strings as it writes
/// them — which `LineCodecTests` checks against the encoder for every field.
extension LineCodec {
    /// `ServerMessage(event: event)` as a line.
    public static func encode(event: Event) throws -> [UInt8] {
        var w = JSONLine()
        w.bytes.reserveCapacity(512)
        w.open()
        w.key("event"); event.write(to: &w)
        w.close()
        // A number JSON cannot hold: the encoder's own error, as before.
        guard w.finite else { return Array(try encode(ServerMessage(event: event))) }
        w.bytes.append(0x0A)
        return w.bytes
    }
}

/// A JSON object writer for the types of the event stream; keys are written in the order
/// given, which each type gives sorted (byte order, as `.sortedKeys` sorts).
struct JSONLine {
    var bytes: [UInt8] = []
    var finite = true
    private var first = true

    mutating func open() { bytes.append(UInt8(ascii: "{")); first = true }
    mutating func close() { bytes.append(UInt8(ascii: "}")); first = false }

    mutating func key(_ name: StaticString) {
        if !first { bytes.append(UInt8(ascii: ",")) }
        first = false
        bytes.append(UInt8(ascii: "\""))
        name.withUTF8Buffer { bytes.append(contentsOf: $0) }
        bytes.append(contentsOf: [UInt8(ascii: "\""), UInt8(ascii: ":")])
    }

    mutating func field(_ name: StaticString, _ value: String?) {
        guard let value else { return }
        key(name); string(value)
    }

    mutating func field<I: BinaryInteger>(_ name: StaticString, _ value: I?) {
        guard let value else { return }
        key(name); bytes.append(contentsOf: value.description.utf8)
    }

    mutating func field(_ name: StaticString, _ value: Double?) {
        guard let value else { return }
        key(name)
        guard value.isFinite else { finite = false; return }
        // The encoder writes Swift's shortest round-trip form without a trailing ".0".
        let text = value.description
        bytes.append(contentsOf: text.hasSuffix(".0") ? text.utf8.dropLast(2) : text.utf8[...])
    }

    mutating func field(_ name: StaticString, _ value: Bool) {
        key(name); bytes.append(contentsOf: (value ? "true" : "false").utf8)
    }

    mutating func field(_ name: StaticString, _ value: Date) {
        key(name)
        bytes.append(UInt8(ascii: "\""))
        LineCodec.iso8601(value, into: &bytes)
        bytes.append(UInt8(ascii: "\""))
    }

    mutating func field<T: JSONLineWritable>(_ name: StaticString, _ value: T?) {
        guard let value else { return }
        key(name); value.write(to: &self)
    }

    mutating func field<T: JSONLineWritable>(_ name: StaticString, _ values: [T]?) {
        guard let values else { return }
        key(name); array(values) { $1.write(to: &$0) }
    }

    mutating func field(_ name: StaticString, _ values: [String]) {
        key(name); array(values) { $0.string($1) }
    }

    private mutating func array<T>(_ values: [T], _ element: (inout JSONLine, T) -> Void) {
        bytes.append(UInt8(ascii: "["))
        for (i, v) in values.enumerated() {
            if i > 0 { bytes.append(UInt8(ascii: ",")) }
            element(&self, v)
        }
        bytes.append(UInt8(ascii: "]"))
        first = false
    }

    /// A string as the encoder escapes it (`/` left alone: `.withoutEscapingSlashes`); runs
    /// without anything to escape (most of every line: paths, names, messages) are copied whole.
    mutating func string(_ text: String) {
        var text = text
        bytes.append(UInt8(ascii: "\""))
        text.withUTF8 { utf8 in
            var run = 0
            for (i, c) in utf8.enumerated() where c < 0x20 || c == UInt8(ascii: "\"") || c == UInt8(ascii: "\\") {
                bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[run..<i]))
                escape(c)
                run = i + 1
            }
            bytes.append(contentsOf: UnsafeBufferPointer(rebasing: utf8[run...]))
        }
        bytes.append(UInt8(ascii: "\""))
        first = false
    }

    private mutating func escape(_ c: UInt8) {
        switch c {
        case 0x08: bytes.append(contentsOf: [0x5C, UInt8(ascii: "b")])
        case 0x0C: bytes.append(contentsOf: [0x5C, UInt8(ascii: "f")])
        case 0x0A: bytes.append(contentsOf: [0x5C, UInt8(ascii: "n")])
        case 0x0D: bytes.append(contentsOf: [0x5C, UInt8(ascii: "r")])
        case 0x09: bytes.append(contentsOf: [0x5C, UInt8(ascii: "t")])
        case 0..<0x20:
            let hex = Array("0123456789abcdef".utf8)
            bytes.append(contentsOf: [0x5C, UInt8(ascii: "u"), 0x30, 0x30, hex[Int(c >> 4)], hex[Int(c & 15)]])
        default: bytes.append(contentsOf: [0x5C, c])  // `"` and `\`
        }
    }
}

/// A type of the event stream that writes itself as a JSON object, keys sorted.
protocol JSONLineWritable {
    func write(to w: inout JSONLine)
}

extension Event: JSONLineWritable {
    func write(to w: inout JSONLine) {
        w.open()
        w.field("device", device)
        w.field("job", job)
        w.field("kind", kind.rawValue)
        w.field("message", message)
        w.close()
    }
}

extension JobRecord: JSONLineWritable {
    func write(to w: inout JSONLine) {
        w.open()
        w.field("created", created)
        w.field("device", device)
        w.field("id", id)
        w.field("image", image)
        w.field("kind", kind)
        w.field("message", message)
        w.field("profile", profile)
        w.field("progress", progress)
        w.field("serial", serial)
        w.field("slot", slot)
        w.field("state", state.rawValue)
        w.field("station", station)
        w.field("unit", unit)
        w.field("updated", updated)
        w.field("users", users)
        w.close()
    }
}

extension JobProgress: JSONLineWritable {
    func write(to w: inout JSONLine) {
        w.open()
        w.field("bytesDone", bytesDone)
        w.field("bytesPerSecond", bytesPerSecond)
        w.field("bytesTotal", bytesTotal)
        w.field("secondsRemaining", secondsRemaining)
        w.close()
    }
}

extension UnitAccount: JSONLineWritable {
    func write(to w: inout JSONLine) {
        w.open()
        w.field("generatedPassword", generatedPassword)
        w.field("name", name)
        w.field("passwordExport", passwordExport)
        w.field("uid", uid)
        w.close()
    }
}

extension DeviceStatus: JSONLineWritable {
    func write(to w: inout JSONLine) {
        w.open()
        w.field("device", device)
        w.field("eligible", eligible)
        w.field("refusals", refusals)
        w.field("serial", serial)
        w.field("size", size)
        w.field("slot", slot)
        w.field("slotPath", slotPath)
        w.field("summary", summary)
        w.close()
    }
}
