import ImageIO
import Pipeline

/// The cache is what the card pipeline's supplier is in the daemon: a compressed image is
/// decompressed once and every card reads the result.
extension ImageCacheStore: ImageSupplier {
    public func supply(image: String, bmap: Bmap?) throws(ImageIOError) -> SuppliedImage {
        let (source, key, note) = try source(for: image, bmap: bmap)
        return SuppliedImage(source: source, token: key, note: note.isEmpty ? nil : note, checkedAgainstBmap: key != nil)
    }

    public func release(_ image: SuppliedImage) { release(image.token) }
}
