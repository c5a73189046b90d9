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
}
