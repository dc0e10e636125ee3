//! Transcoding profiles: the built-in ones m3u-proxy names (API-COMPAT-FFMPEG
//! §3) and the ones in the YAML (`transcode.profiles`), each a template
//! with default variables.

use std::collections::BTreeMap;

/// A named template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub template: String,
    /// Values for the template's placeholders unless the caller sets them.
    pub defaults: BTreeMap<String, String>,
}

/// m3u-proxy's built-in profiles, same names and shapes.
const BUILT_IN: &[(&str, &str, &str)] = &[
    (
        "default",
        "H.264/AAC, CPU encoding",
        "-i {input_url} -c:v libx264 -preset faster -b:v {video_bitrate|2M} -c:a aac -b:a {audio_bitrate|128k} -f {format|mpegts} {output_args}",
    ),
    (
        "hq",
        "H.264/AAC, constant quality",
        "-i {input_url} -c:v libx264 -preset medium -crf {crf|23} -c:a aac -b:a {audio_bitrate|192k} -f {format|mpegts} {output_args}",
    ),
    (
        "lowlatency",
        "H.264/AAC tuned for latency",
        "-i {input_url} -c:v libx264 -preset veryfast -tune zerolatency -b:v {video_bitrate|1M} -c:a aac -b:a {audio_bitrate|96k} -f {format|mpegts} {output_args}",
    ),
    (
        "720p",
        "H.264/AAC scaled to 720p",
        "-i {input_url} -vf scale=-2:720 -c:v libx264 -preset faster -b:v {video_bitrate|2500k} -c:a aac -b:a {audio_bitrate|128k} -f {format|mpegts} {output_args}",
    ),
    (
        "1080p",
        "H.264/AAC scaled to 1080p",
        "-i {input_url} -vf scale=-2:1080 -c:v libx264 -preset faster -b:v {video_bitrate|5000k} -c:a aac -b:a {audio_bitrate|192k} -f {format|mpegts} {output_args}",
    ),
    (
        "hevc",
        "H.265/AAC, CPU encoding",
        "-i {input_url} -c:v libx265 -preset faster -b:v {video_bitrate|2M} -c:a aac -b:a {audio_bitrate|128k} -f {format|mpegts} {output_args}",
    ),
    (
        "audio",
        "Audio only, AAC",
        "-i {input_url} -vn -c:a aac -b:a {audio_bitrate|128k} -f {format|mpegts} {output_args}",
    ),
];

/// The built-in profiles.
pub fn built_in() -> Vec<Profile> {
    BUILT_IN
        .iter()
        .map(|(name, description, template)| Profile {
            name: name.to_string(),
            description: description.to_string(),
            template: template.to_string(),
            defaults: BTreeMap::new(),
        })
        .collect()
}

/// The profiles in force: the YAML's over the built-in ones of the same name.
pub fn all(configured: &[Profile]) -> Vec<Profile> {
    let mut out = built_in();
    for p in configured {
        match out.iter_mut().find(|b| b.name == p.name) {
            Some(b) => *b = p.clone(),
            None => out.push(p.clone()),
        }
    }
    out
}

/// A template's placeholders and their defaults, for `GET /transcode/profiles`.
pub fn parameters(template: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 1..start + len];
        let (name, default) = match inner.split_once('|') {
            Some((n, d)) => (n, Some(d.to_string())),
            None => (inner, None),
        };
        if !matches!(name, "input_url" | "output_args") && !out.iter().any(|(n, _)| n == name) {
            out.push((name.to_string(), default));
        }
        rest = &rest[start + len + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::template;

    #[test]
    fn every_built_in_profile_renders() {
        for p in built_in() {
            let r = template::render(&p.template, &BTreeMap::new(), &p.defaults)
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(r.args.last().map(String::as_str), Some("pipe:1"));
        }
        let names: Vec<String> = built_in().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "default",
                "hq",
                "lowlatency",
                "720p",
                "1080p",
                "hevc",
                "audio"
            ]
        );
    }

    #[test]
    fn yaml_profiles_replace_or_add() {
        let mine = Profile {
            name: "hq".into(),
            description: "mine".into(),
            template: "-i {input_url} -c copy".into(),
            defaults: BTreeMap::new(),
        };
        let all = all(&[mine]);
        assert_eq!(all.len(), built_in().len());
        assert_eq!(
            all.iter().find(|p| p.name == "hq").unwrap().description,
            "mine"
        );
        assert_eq!(
            parameters("-i {input_url} -b:v {video_bitrate|2M} -crf {crf}"),
            vec![
                ("video_bitrate".into(), Some("2M".into())),
                ("crf".into(), None)
            ]
        );
    }
}
