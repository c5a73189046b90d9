/// A flattened device tree (DTB) as an editable tree, and back to bytes.
///
/// The flasher must set `/config` properties in U-Boot's control DTB. Parsing the whole
/// blob into nodes and writing a fresh one (header v17, memory reservations kept, strings
/// deduplicated) is simpler to get right than patching offsets in place, and the output
/// is what `dtc` itself would write.
public struct FlattenedDeviceTree: Sendable, Equatable {
    public struct Property: Sendable, Equatable {
        public var name: String
        public var value: [UInt8]
    }

    public struct Node: Sendable, Equatable {
        public var name: String
        public var properties: [Property] = []
        public var children: [Node] = []

        public init(name: String) { self.name = name }

        public func property(_ name: String) -> [UInt8]? {
            properties.first { $0.name == name }?.value
        }

        public mutating func setProperty(_ name: String, _ value: [UInt8]) {
            if let index = properties.firstIndex(where: { $0.name == name }) {
                properties[index].value = value
            } else {
                properties.append(Property(name: name, value: value))
            }
        }
    }

    public static let magic: UInt32 = 0xD00D_FEED
    static let headerLength = 40
    enum Token: UInt32 { case beginNode = 1, endNode = 2, prop = 3, nop = 4, end = 9 }

    public var root: Node
    public var memoryReservations: [(address: UInt64, size: UInt64)] = []
    public var bootCPUID: UInt32 = 0

    public static func == (a: Self, b: Self) -> Bool {
        a.root == b.root && a.bootCPUID == b.bootCPUID
            && a.memoryReservations.map { [$0.address, $0.size] } == b.memoryReservations.map { [$0.address, $0.size] }
    }

    // MARK: parsing

    public init(parsing blob: [UInt8], name: String = "DTB") throws {
        func bad(_ what: String) -> TegraError { TegraError(.invalidInput, "\(name): not a usable device tree: \(what)") }
        guard blob.count >= Self.headerLength else { throw bad("\(blob.count) bytes, shorter than a header") }
        guard blob.loadBE32(at: 0) == Self.magic else {
            throw bad("magic \(hex32(blob.loadBE32(at: 0))) at offset 0, expected 0xd00dfeed")
        }
        let totalSize = Int(blob.loadBE32(at: 4))
        let structOffset = Int(blob.loadBE32(at: 8))
        let stringsOffset = Int(blob.loadBE32(at: 12))
        let reservationOffset = Int(blob.loadBE32(at: 16))
        let version = blob.loadBE32(at: 20)
        let lastCompatible = blob.loadBE32(at: 24)
        bootCPUID = blob.loadBE32(at: 28)
        let stringsSize = Int(blob.loadBE32(at: 32))
        let structSize = Int(blob.loadBE32(at: 36))
        guard version >= 17, lastCompatible <= 17 else {
            throw bad("version \(version) (last compatible \(lastCompatible)); this editor reads version 17")
        }
        guard totalSize <= blob.count,
              structOffset + structSize <= totalSize, stringsOffset + stringsSize <= totalSize,
              reservationOffset + 16 <= totalSize else {
            throw bad("header offsets/sizes point past the \(blob.count)-byte blob")
        }

        var offset = reservationOffset
        while true {
            guard offset + 16 <= totalSize else { throw bad("memory reservation map not terminated") }
            let address = blob.loadBE64(at: offset), size = blob.loadBE64(at: offset + 8)
            offset += 16
            if address == 0 && size == 0 { break }
            memoryReservations.append((address, size))
        }

        let strings = blob[stringsOffset..<(stringsOffset + stringsSize)]
        var reader = StructReader(bytes: Array(blob[structOffset..<(structOffset + structSize)]), strings: Array(strings))
        guard let first = try reader.nextToken(bad), first == .beginNode else { throw bad("structure block does not start with a node") }
        root = try reader.readNode(bad)
        while let token = try reader.nextToken(bad), token != .end {
            guard token == .nop else { throw bad("data after the root node at struct offset \(reader.offset - 4)") }
        }
    }

    struct StructReader {
        let bytes: [UInt8]
        let strings: [UInt8]
        var offset = 0

        mutating func word(_ bad: (String) -> TegraError) throws -> UInt32 {
            guard offset + 4 <= bytes.count else { throw bad("structure block ends early at offset \(offset)") }
            defer { offset += 4 }
            return bytes.loadBE32(at: offset)
        }

        mutating func nextToken(_ bad: (String) -> TegraError) throws -> Token? {
            let raw = try word(bad)
            guard let token = Token(rawValue: raw) else { throw bad("unknown token \(raw) at struct offset \(offset - 4)") }
            return token
        }

        /// Nodes nested deeper than this are refused (libfdt's own tools stop at 64 and less;
        /// a deeper blob would overflow the stack here, one frame per level).
        static let maximumDepth = 64

        /// Reads a node whose BEGIN_NODE token was just consumed.
        mutating func readNode(_ bad: (String) -> TegraError, depth: Int = 1) throws -> Node {
            guard depth <= Self.maximumDepth else { throw bad("nodes nested deeper than \(Self.maximumDepth) levels at struct offset \(offset - 4)") }
            guard let end = bytes[offset...].firstIndex(of: 0) else { throw bad("unterminated node name") }
            var node = Node(name: String(decoding: bytes[offset..<end], as: UTF8.self))
            offset = (end + 1 + 3) & ~3
            while true {
                switch try nextToken(bad) {
                case .prop:
                    let length = Int(try word(bad)), nameOffset = Int(try word(bad))
                    guard offset + length <= bytes.count, nameOffset < strings.count,
                          let nameEnd = strings[nameOffset...].firstIndex(of: 0) else {
                        throw bad("property at struct offset \(offset - 12) points outside the blob")
                    }
                    let name = String(decoding: strings[nameOffset..<nameEnd], as: UTF8.self)
                    node.properties.append(Property(name: name, value: Array(bytes[offset..<(offset + length)])))
                    offset = (offset + length + 3) & ~3
                case .beginNode:
                    node.children.append(try readNode(bad, depth: depth + 1))
                case .endNode:
                    return node
                case .nop:
                    continue
                case .end, .none:
                    throw bad("structure block ends inside node \"\(node.name)\"")
                }
            }
        }
    }

    // MARK: editing

    /// Sets a property on the node at `path` (e.g. "/config"), creating the node if missing.
    public mutating func setProperty(path: String, name: String, value: [UInt8]) {
        let components = path.split(separator: "/").map(String.init)
        Self.set(in: &root, components: components[...], name: name, value: value)
    }

    private static func set(in node: inout Node, components: ArraySlice<String>, name: String, value: [UInt8]) {
        guard let first = components.first else {
            node.setProperty(name, value)
            return
        }
        if let index = node.children.firstIndex(where: { $0.name == first }) {
            set(in: &node.children[index], components: components.dropFirst(), name: name, value: value)
        } else {
            var child = Node(name: first)
            set(in: &child, components: components.dropFirst(), name: name, value: value)
            node.children.append(child)
        }
    }

    public func node(at path: String) -> Node? {
        var node = root
        for component in path.split(separator: "/") {
            guard let child = node.children.first(where: { $0.name == component }) else { return nil }
            node = child
        }
        return node
    }

    public static func u32Value(_ value: UInt32) -> [UInt8] {
        var bytes = [UInt8]()
        bytes.appendBE32(value)
        return bytes
    }

    public static func stringValue(_ value: String) -> [UInt8] { Array(value.utf8) + [0] }

    // MARK: writing

    /// The tree as a version-17 blob: header, reservation map, structure block, strings block.
    public func serialized() -> [UInt8] {
        var strings = [UInt8]()
        var stringOffsets = [String: UInt32]()
        var structure = [UInt8]()

        func emit(_ node: Node) {
            structure.appendBE32(Token.beginNode.rawValue)
            structure.append(contentsOf: Array(node.name.utf8) + [0])
            while structure.count % 4 != 0 { structure.append(0) }
            for property in node.properties {
                let nameOffset: UInt32
                if let known = stringOffsets[property.name] {
                    nameOffset = known
                } else {
                    nameOffset = UInt32(strings.count)
                    stringOffsets[property.name] = nameOffset
                    strings.append(contentsOf: Array(property.name.utf8) + [0])
                }
                structure.appendBE32(Token.prop.rawValue)
                structure.appendBE32(UInt32(property.value.count))
                structure.appendBE32(nameOffset)
                structure.append(contentsOf: property.value)
                while structure.count % 4 != 0 { structure.append(0) }
            }
            for child in node.children { emit(child) }
            structure.appendBE32(Token.endNode.rawValue)
        }
        emit(root)
        structure.appendBE32(Token.end.rawValue)

        var reservations = [UInt8]()
        for entry in memoryReservations {
            reservations.appendBE64(entry.address)
            reservations.appendBE64(entry.size)
        }
        reservations.append(contentsOf: [UInt8](repeating: 0, count: 16))

        let reservationOffset = 48  // header 40, rounded up to 8 as the spec requires for the map
        let structOffset = reservationOffset + reservations.count
        let stringsOffset = structOffset + structure.count
        let total = stringsOffset + strings.count

        var blob = [UInt8]()
        for word in [Self.magic, UInt32(total), UInt32(structOffset), UInt32(stringsOffset),
                     UInt32(reservationOffset), 17, 16, bootCPUID, UInt32(strings.count), UInt32(structure.count)] {
            blob.appendBE32(word)
        }
        blob.append(contentsOf: [UInt8](repeating: 0, count: reservationOffset - blob.count))
        blob.append(contentsOf: reservations)
        blob.append(contentsOf: structure)
        blob.append(contentsOf: strings)
        return blob
    }
}

extension Array where Element == UInt8 {
    mutating func appendBE32(_ value: UInt32) {
        append(UInt8(truncatingIfNeeded: value >> 24))
        append(UInt8(truncatingIfNeeded: value >> 16))
        append(UInt8(truncatingIfNeeded: value >> 8))
        append(UInt8(truncatingIfNeeded: value))
    }

    mutating func appendBE64(_ value: UInt64) {
        appendBE32(UInt32(truncatingIfNeeded: value >> 32))
        appendBE32(UInt32(truncatingIfNeeded: value))
    }

    func loadBE32(at offset: Int) -> UInt32 {
        UInt32(self[offset]) << 24 | UInt32(self[offset + 1]) << 16 | UInt32(self[offset + 2]) << 8 | UInt32(self[offset + 3])
    }

    func loadBE64(at offset: Int) -> UInt64 {
        UInt64(loadBE32(at: offset)) << 32 | UInt64(loadBE32(at: offset + 4))
    }
}
