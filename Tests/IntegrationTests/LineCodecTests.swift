@testable import ControlProtocol
import Foundation
import Testing

/// The control protocol's lines are written by one shared encoder with its own ISO 8601 date
/// writer (issue 18: a new encoder and Foundation's date style per line were most of the event
/// stream's CPU). What it writes must be what Foundation's `.iso8601` writes, byte for byte.
@Suite("control protocol line codec")
struct LineCodecTests {
    struct Stamped: Codable, Equatable {
        var at: Date
        var name: String
        var path: String
    }

    @Test("dates are written as Foundation's .iso8601 writes them, from 1900 to 2100, fractions of seconds included, and read back")
    func datesAsFoundationWritesThem() throws {
        let reference = JSONEncoder()
        reference.dateEncodingStrategy = .iso8601
        reference.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        var generator = SystemRandomNumberGenerator()
        var dates = [Date(timeIntervalSince1970: 0), Date(timeIntervalSince1970: -1), Date(timeIntervalSince1970: 0.999),
                     Date(timeIntervalSince1970: 951_782_400)]  // 2000-02-29
        for _ in 0..<2000 { dates.append(Date(timeIntervalSince1970: Double.random(in: -2_208_988_800...4_102_444_800, using: &generator))) }
        for date in dates {
            let value = Stamped(at: date, name: "job 1", path: "/dev/sdb")
            var expected = try reference.encode(value)
            expected.append(0x0A)
            let line = try LineCodec.encode(value)
            #expect(line == expected, "\(date.timeIntervalSince1970): \(String(decoding: line, as: UTF8.self))")
            let back = try LineCodec.decode(Stamped.self, from: line)
            #expect(back.at == Date(timeIntervalSince1970: date.timeIntervalSince1970.rounded(.down)))
        }
    }

    @Test("one encoder shared by many threads at once writes every line whole")
    func sharedAcrossThreads() async throws {
        let lines = try await withThrowingTaskGroup(of: (Int, Data).self) { group in
            for i in 0..<200 {
                group.addTask { (i, try LineCodec.encode(Stamped(at: Date(timeIntervalSince1970: Double(i)), name: "n\(i)", path: "/p/\(i)"))) }
            }
            var all: [(Int, Data)] = []
            for try await r in group { all.append(r) }
            return all
        }
        #expect(lines.count == 200)
        for (i, line) in lines {
            #expect(try LineCodec.decode(Stamped.self, from: line) == Stamped(at: Date(timeIntervalSince1970: Double(i)), name: "n\(i)", path: "/p/\(i)"))
        }
    }

    /// Strings with every character class the encoder treats apart: quotes, backslashes,
    /// slashes, each control character, DEL, non-ASCII, a character outside the BMP.
    static let awkward = ["", "plain", "a\"b\\c/d", String((0..<32).map { Character(Unicode.Scalar(UInt8($0))) }),
                          "\u{7f}é\u{2028}😀", "refusing /dev/sdb: 7.9 GB card is not in a slot"]

    static func randomDouble(_ g: inout SystemRandomNumberGenerator) -> Double {
        switch Int.random(in: 0..<6, using: &g) {
        case 0: return Double(Int.random(in: -1_000_000...1_000_000, using: &g))
        case 1: return Double.random(in: 0..<1, using: &g)
        case 2: return Double.random(in: 0..<60_000_000, using: &g)
        case 3: return Double(bitPattern: UInt64.random(in: 0...0x7FEF_FFFF_FFFF_FFFF, using: &g))
        case 4: return [0, -0.0, 1e-5, 1e15, 1e16, 1e21, 9007199254740992, 5e-324][Int.random(in: 0..<8, using: &g)]
        default: return -Double.random(in: 0..<1e9, using: &g)
        }
    }

    static func randomEvent(_ g: inout SystemRandomNumberGenerator, full: Bool) -> Event {
        func maybe<T>(_ v: @autoclosure () -> T) -> T? { full || Bool.random(using: &g) ? v() : nil }
        func text() -> String { awkward.randomElement(using: &g)! + String(Int.random(in: 0..<1000, using: &g)) }
        let progress = JobProgress(bytesDone: UInt64.random(in: 0...UInt64.max, using: &g), bytesTotal: maybe(UInt64.random(in: 0...1 << 40, using: &g)),
                                   bytesPerSecond: randomDouble(&g), secondsRemaining: maybe(randomDouble(&g)))
        let users = (0..<Int.random(in: 0..<3, using: &g)).map { _ in
            UnitAccount(name: text(), uid: Int.random(in: -5...70000, using: &g), generatedPassword: maybe(text()), passwordExport: maybe(text()))
        }
        var job = JobRecord(id: Int64.random(in: Int64.min...Int64.max, using: &g), kind: text(), slot: maybe(text()), device: text(),
                            serial: maybe(text()), unit: maybe(text()), profile: maybe(text()), image: maybe(text()),
                            state: JobState.allCases.randomElement(using: &g)!, progress: maybe(progress), message: maybe(text()),
                            created: Date(timeIntervalSince1970: Double.random(in: 0...4e9, using: &g)),
                            updated: Date(timeIntervalSince1970: Double.random(in: 0...4e9, using: &g)),
                            users: full ? [UnitAccount(name: text(), uid: 1000, generatedPassword: text(), passwordExport: text())] + users : maybe(users))
        job.station = maybe(text())
        let device = DeviceStatus(device: text(), summary: text(), size: UInt64.random(in: 0...UInt64.max, using: &g), serial: maybe(text()),
                                  slot: maybe(text()), slotPath: maybe(text()), eligible: Bool.random(using: &g),
                                  refusals: (0..<Int.random(in: full ? 1..<4 : 0..<4, using: &g)).map { _ in text() })
        return Event(kind: [.job, .device, .deviceRemoved, .reload].randomElement(using: &g)!, job: maybe(job), device: maybe(device), message: maybe(text()))
    }

    /// Every stored property of `value`, recursively, is set (none is nil).
    static func unset(_ value: Any, path: String = "") -> [String] {
        Mirror(reflecting: value).children.flatMap { child -> [String] in
            let name = path + "." + (child.label ?? "?")
            let inner = Mirror(reflecting: child.value)
            if inner.displayStyle == .optional {
                guard let some = inner.children.first?.value else { return [name] }
                return unset(some, path: name)
            }
            if inner.displayStyle == .struct { return unset(child.value, path: name) }
            if inner.displayStyle == .collection { return inner.children.flatMap { unset($0.value, path: name) } }
            return []
        }
    }

    @Test("event lines written field by field are the encoder's bytes: every field set, fields left out, awkward strings and doubles")
    func eventLinesAreTheEncodersBytes() throws {
        var g = SystemRandomNumberGenerator()
        let full = Self.randomEvent(&g, full: true)
        // A field added to the event's types and not to their writers would be missing from
        // every line: the full event sets every field there is, so the comparison sees it.
        #expect(Self.unset(full) == [])
        for i in 0..<3000 {
            let event = Self.randomEvent(&g, full: i % 3 == 0)
            let line = try LineCodec.encode(event: event)
            let expected = try LineCodec.encode(ServerMessage(event: event))
            #expect(Data(line) == expected, "\(String(decoding: line, as: UTF8.self))\n\(String(decoding: expected, as: UTF8.self))")
            if Data(line) != expected { break }
            #expect(try LineCodec.decode(ServerMessage.self, from: Data(line)).event == Event(kind: event.kind, job: event.job.map {
                var j = $0; j.created = Date(timeIntervalSince1970: j.created.timeIntervalSince1970.rounded(.down))
                j.updated = Date(timeIntervalSince1970: j.updated.timeIntervalSince1970.rounded(.down)); return j
            }, device: event.device, message: event.message))
        }
    }

    @Test("an event with a number JSON cannot hold is refused, as the encoder refuses it")
    func nonFiniteNumbersRefused() {
        var g = SystemRandomNumberGenerator()
        var event = Self.randomEvent(&g, full: true)
        event.job?.progress?.bytesPerSecond = .nan
        #expect(throws: EncodingError.self) { try LineCodec.encode(event: event) }
        event.job?.progress?.bytesPerSecond = 1
        event.job?.progress?.secondsRemaining = .infinity
        #expect(throws: EncodingError.self) { try LineCodec.encode(event: event) }
    }
}
