import NIOCore
@testable import provisiond
import Testing

/// The control socket's line limit holds whether or not a line's end came in the same read.
@Suite("control request lines and their limit")
struct LineFramerTests {
    static func frames(_ chunks: [String], maxLength: Int) -> [String] {
        var framer = LineFramer(maxLength: maxLength)
        var out: [String] = []
        for chunk in chunks {
            var bytes = ByteBuffer(string: chunk)
            framer.append(&bytes)
            while let frame = framer.next() {
                switch frame {
                case .line(let line): out.append(String(buffer: line))
                case .tooLong: out.append("<too long>")
                }
            }
        }
        return out
    }

    @Test("a line over the limit is refused once, also when its newline arrives with it; the lines after it are read")
    func limitHoldsWithTheNewlineInTheSameRead() {
        // 12 bytes and the newline in one read, against a limit of 10.
        #expect(Self.frames(["0123456789AB\nok\n"], maxLength: 10) == ["<too long>", "ok"])
        // Exactly at the limit is a line.
        #expect(Self.frames(["0123456789\n"], maxLength: 10) == ["0123456789"])
        // Over the limit before its newline: refused once, the rest of it dropped.
        #expect(Self.frames(["0123456789AB", "CDEF\n", "next\n"], maxLength: 10) == ["<too long>", "next"])
    }
}
