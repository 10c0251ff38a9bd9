using MixerFlow.Core;
using MixerFlow.Host.Files;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.PixelFormats;
using static TorchSharp.torch;

namespace MixerFlow.Host.Imaging;

/// <summary>
/// Several models' samples in one PNG: one row per model, its label written on the left (a built-in
/// 5x7 pixel font, so no font or native library is needed), then its images side by side.
/// </summary>
public static class SampleSheet
{
    const int GlyphWidth = 5, GlyphHeight = 7, FontScale = 2, Gap = 4;

    /// <summary>
    /// Writes the rows to <paramref name="path"/> atomically as an RGB PNG. Each row's images are
    /// [N, C, H, W] holding 0..255 (C = 1 or 3; grey images are drawn grey); rows may differ in shape.
    /// Labels are written in capitals; characters the font lacks are drawn as '?'.
    /// </summary>
    public static void Save(IReadOnlyList<(string Label, Tensor Images)> rows, string path, int scale = 2)
    {
        ArgumentNullException.ThrowIfNull(rows);
        if (rows.Count == 0) throw new ArgumentException("no rows to write", nameof(rows));
        if (scale < 1) throw new ArgumentOutOfRangeException(nameof(scale), "must be at least 1");
        var tiles = new List<(string Label, byte[] Pixels, int N, int C, int H, int W)>();
        foreach (var (label, images) in rows)
        {
            using var scope = NewDisposeScope();
            var t = images.dim() == 3 ? images.unsqueeze(0) : images;
            if (t.dim() != 4 || (t.shape[1] != 1 && t.shape[1] != 3))
                throw new ArgumentException($"row '{label}': images must be [N, 1 or 3, H, W], got [{string.Join(", ", images.shape)}]");
            var bytes = t.detach().to(CPU).to_type(float32).clamp(Ops.Scalar(0), Ops.Scalar(255)).round().to_type(ScalarType.Byte).contiguous().data<byte>().ToArray();
            tiles.Add((label, bytes, (int)t.shape[0], (int)t.shape[1], (int)t.shape[2], (int)t.shape[3]));
        }
        int labelWidth = tiles.Max(r => TextWidth(r.Label)) + 2 * Gap;
        int width = labelWidth + tiles.Max(r => r.N * (r.W * scale + 1)) + Gap;
        var heights = tiles.Select(r => Math.Max(r.H * scale, GlyphHeight * FontScale) + Gap).ToArray();
        int height = heights.Sum() + Gap;
        using var image = new Image<Rgb24>(width, height, new Rgb24(255, 255, 255));
        int y0 = Gap;
        for (int r = 0; r < tiles.Count; r++)
        {
            var (label, px, n, c, h, w) = tiles[r];
            int rowHeight = heights[r] - Gap;
            DrawText(image, label, Gap, y0 + (rowHeight - GlyphHeight * FontScale) / 2);
            for (int i = 0; i < n; i++)
            {
                int x0 = labelWidth + i * (w * scale + 1);
                for (int y = 0; y < h * scale; y++)
                    for (int x = 0; x < w * scale; x++)
                    {
                        int sy = y / scale, sx = x / scale, at = i * c * h * w + sy * w + sx;
                        byte R = px[at], G = c == 3 ? px[at + h * w] : R, B = c == 3 ? px[at + 2 * h * w] : R;
                        image[x0 + x, y0 + y] = new Rgb24(R, G, B);
                    }
            }
            y0 += heights[r];
        }
        AtomicFile.Write(path, (Stream s) => image.SaveAsPng(s));
    }

    /// <summary>Width in pixels of <paramref name="text"/> in the sheet's font.</summary>
    public static int TextWidth(string text) => text.Length * (GlyphWidth + 1) * FontScale;

    static void DrawText(Image<Rgb24> image, string text, int x0, int y0)
    {
        var ink = new Rgb24(0, 0, 0);
        for (int k = 0; k < text.Length; k++)
        {
            var glyph = Glyph(text[k]);
            for (int gy = 0; gy < GlyphHeight; gy++)
                for (int gx = 0; gx < GlyphWidth; gx++)
                {
                    if (glyph[gy][gx] != '1') continue;
                    for (int dy = 0; dy < FontScale; dy++)
                        for (int dx = 0; dx < FontScale; dx++)
                        {
                            int x = x0 + (k * (GlyphWidth + 1) + gx) * FontScale + dx, y = y0 + gy * FontScale + dy;
                            if (x >= 0 && y >= 0 && x < image.Width && y < image.Height) image[x, y] = ink;
                        }
                }
        }
    }

    static string[] Glyph(char c) => Font.TryGetValue(char.ToUpperInvariant(c), out var g) ? g : Font['?'];

    // A classic 5x7 font: rows top to bottom, '1' = ink.
    static readonly Dictionary<char, string[]> Font = new()
    {
        ['A'] = ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
        ['B'] = ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
        ['C'] = ["01110", "10001", "10000", "10000", "10000", "10001", "01110"],
        ['D'] = ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
        ['E'] = ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
        ['F'] = ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
        ['G'] = ["01110", "10001", "10000", "10111", "10001", "10001", "01111"],
        ['H'] = ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
        ['I'] = ["01110", "00100", "00100", "00100", "00100", "00100", "01110"],
        ['J'] = ["00111", "00010", "00010", "00010", "00010", "10010", "01100"],
        ['K'] = ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
        ['L'] = ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
        ['M'] = ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
        ['N'] = ["10001", "10001", "11001", "10101", "10011", "10001", "10001"],
        ['O'] = ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
        ['P'] = ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
        ['Q'] = ["01110", "10001", "10001", "10001", "10101", "10010", "01101"],
        ['R'] = ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
        ['S'] = ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
        ['T'] = ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
        ['U'] = ["10001", "10001", "10001", "10001", "10001", "10001", "01110"],
        ['V'] = ["10001", "10001", "10001", "10001", "10001", "01010", "00100"],
        ['W'] = ["10001", "10001", "10001", "10101", "10101", "10101", "01010"],
        ['X'] = ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
        ['Y'] = ["10001", "10001", "10001", "01010", "00100", "00100", "00100"],
        ['Z'] = ["11111", "00001", "00010", "00100", "01000", "10000", "11111"],
        ['0'] = ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
        ['1'] = ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
        ['2'] = ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
        ['3'] = ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
        ['4'] = ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
        ['5'] = ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
        ['6'] = ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
        ['7'] = ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
        ['8'] = ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
        ['9'] = ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
        ['-'] = ["00000", "00000", "00000", "11111", "00000", "00000", "00000"],
        ['_'] = ["00000", "00000", "00000", "00000", "00000", "00000", "11111"],
        ['.'] = ["00000", "00000", "00000", "00000", "00000", "01100", "01100"],
        ['='] = ["00000", "00000", "11111", "00000", "11111", "00000", "00000"],
        [':'] = ["00000", "01100", "01100", "00000", "01100", "01100", "00000"],
        ['+'] = ["00000", "00100", "00100", "11111", "00100", "00100", "00000"],
        ['/'] = ["00000", "00001", "00010", "00100", "01000", "10000", "00000"],
        ['('] = ["00010", "00100", "01000", "01000", "01000", "00100", "00010"],
        [')'] = ["01000", "00100", "00010", "00010", "00010", "00100", "01000"],
        [','] = ["00000", "00000", "00000", "00000", "01100", "00100", "01000"],
        ['?'] = ["01110", "10001", "00001", "00010", "00100", "00000", "00100"],
        [' '] = ["00000", "00000", "00000", "00000", "00000", "00000", "00000"],
    };
}
